"""Shadow deployment, the report: how a shadow model version's predictions (the shadow topic)
compare with the active version's (the predictions topic) over the orders both scored
(`triage models compare`, and the live gate of `triage models promote`, model/registry.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from triage.bus.settings import ConnectionSettings, TopicSettings


def compare(connection: ConnectionSettings, topics: TopicSettings, *, since_ms: int,
            idle_s: float = 3.0, shadow_version: str | None = None,
            active_version: str | None = None,
            policy_of: Callable[[str], str] = lambda version: "v1") -> dict[str, Any]:
    """Agreement of the shadow version with the active one over the orders both scored since
    ``since_ms`` (UTC ms): the shadow topic's predictions joined to the predictions topic's
    first revisions by order (partition and offset of the order, so a re-read order counts
    once; the shadow scored the features of the first revision, and is not corrected). Returns
    {"active", "shadow", "pairs", "agreement" (0..1), "classes", "confusion" (rows: active,
    columns: shadow), "policy", "active_policy_agreement", "shadow_policy_agreement" (0..1:
    agreement with the shadow version's policy, ``policy_of(version)``, model/policy.py
    POLICIES, applied to the features the shadow scored with)}; with
    several versions in the window, the most frequent of each, unless ``shadow_version`` and
    ``active_version`` name the pair to compare."""
    from collections import Counter

    from triage.consumer.reader import TopicReader
    from triage.model.features import FEATURE_NAMES, FeatureBatch
    from triage.model.policy import CLASSES, POLICIES

    def read(topic: str, version: str | None) -> dict[tuple[int, int], dict[str, Any]]:
        with TopicReader(connection, topic, "prediction") as reader:
            return {(p["order_partition"], p["order_offset"]): p
                    for _, p in reader.read(idle_s=idle_s)
                    if p is not None and p["scored_at_ms"] >= since_ms and p["revision"] == 1
                    and version in (None, p["model_version"])}

    shadow = read(topics.shadow_topic, shadow_version)
    active = read(topics.predictions_topic, active_version) if shadow else {}
    pairs = [(active[k], s) for k, s in shadow.items() if k in active]
    index = {c: i for i, c in enumerate(CLASSES)}
    confusion = [[0] * len(CLASSES) for _ in CLASSES]
    for a, s in pairs:
        confusion[index[a["recommendation"]]][index[s["recommendation"]]] += 1
    agreed = sum(confusion[i][i] for i in range(len(CLASSES)))

    def most(records: list[dict[str, Any]]) -> str | None:
        counts = Counter(r["model_version"] for r in records)
        return counts.most_common(1)[0][0] if counts else None

    policy: list[str] = []
    policy_name = policy_of(shadow_version or most([s for _, s in pairs]) or "") \
        if pairs else "v1"
    if pairs:
        features = FeatureBatch.from_values(
            {name: [s["features"][name] for _, s in pairs] for name in FEATURE_NAMES})
        policy = POLICIES[policy_name](features).tolist()

    def with_policy(side: int) -> float:
        same = sum(pair[side]["recommendation"] == p for pair, p in zip(pairs, policy,
                                                                          strict=True))
        return same / len(pairs) if pairs else 0.0

    return {"active": most([a for a, _ in pairs]), "shadow": most([s for _, s in pairs]),
            "pairs": len(pairs), "agreement": agreed / len(pairs) if pairs else 0.0,
            "classes": list(CLASSES), "confusion": confusion, "policy": policy_name,
            "active_policy_agreement": with_policy(0), "shadow_policy_agreement": with_policy(1)}
