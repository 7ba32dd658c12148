"""The model artifact: XGBoost's native JSON model plus ``manifest.json``. Nothing is pickled.

The manifest holds the version, the feature order, the category vocabularies, the classes, the
training metrics, the drift baseline and the sha256 of every other file. :func:`load` checks
every hash before it parses anything, and refuses the artifact if one differs.

Unknown categories: a ``payment_status`` the model never saw (say ``CHARGEBACK``) is encoded
as the reserved category ``__UNSEEN__``. Training teaches the model that category by relabelling
a share of non-OK statuses as ``__UNSEEN__`` (their labels stay as the policy gave them), so an
unseen status is scored like any other non-OK status, which is what the policy says.

Design columns: the manifest's ``feature_order`` names the columns of the matrix the classifier
was fitted on, and :class:`DesignColumns` builds that matrix from a :class:`FeatureBatch` by
name. The names it knows:

* ``order_hour_of_day``: the hour, 0-23.
* ``in_stock``: 1.0 when inventory > 0, else 0.0 (missing inventory is 0.0). Models trained
  now see stock only through this column, so no tree can split the level at a threshold other
  than the policy's 0: a level the history never had (0.5 of a good sold by weight) gets the
  answer the policy gives.
* ``inventory``: the raw level, NaN when missing. No longer trained on; kept so that artifacts
  written before ``in_stock`` existed still load and predict exactly as they did.
* ``zip_code_available``: 1.0 or 0.0.
* ``payment_status=<S>``: one-hot over the vocabulary; a status outside it sets
  ``payment_status=__UNSEEN__``.
* a windowed feature's name (``customer_orders_1h``...: model/windows.py): its value, NaN
  where null (XGBoost's missing value). Only in models trained with ``--windowed``.

A manifest naming any other column is refused when the artifact is loaded.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # xgboost is imported when a model is loaded, not with this module
    from xgboost import Booster, XGBClassifier

from triage.bus.errors import ConfigurationError
from triage.model.features import FEATURES, WINDOWED_NAMES, FeatureBatch

MANIFEST = "manifest.json"
MODEL_FILE = "model.json"
FORMAT = "triage-model/1"
UNSEEN_STATUS = "__UNSEEN__"


class ArtifactError(ConfigurationError):
    """The model directory is missing a file, or a file is not what the manifest says."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def feature_order(vocabularies: dict[str, list[str]], windowed: Sequence[str] = ()
                  ) -> list[str]:
    """Design column names for a model trained now: every feature's trained columns
    (``in_stock``, not the raw ``inventory``), then the ``windowed`` features named (each its
    own column, NaN where null: XGBoost's missing value), then, per categorical feature, one
    ``<name>=<value>`` column for each entry of its vocabulary (model.features.FEATURES).
    Raises ArtifactError for a name in ``windowed`` that is no windowed feature."""
    unknown = sorted(set(windowed) - set(WINDOWED_NAMES))
    if unknown:
        raise ArtifactError(f"{', '.join(unknown)}: no such windowed feature; declared: "
                            f"{', '.join(WINDOWED_NAMES)} (model/windows.py)")
    numeric = [column for f in FEATURES for column in f.trained_design]
    numeric += [name for name in WINDOWED_NAMES if name in windowed]
    one_hot = [f"{f.name}={value}" for f in FEATURES if f.categorical
               for value in vocabularies[f.name]]
    return [*numeric, *one_hot]


# Column name -> (feature, builder), from every feature's declared design columns.
_NUMERIC_BUILDERS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    column: (f.name, build) for f in FEATURES for column, build in f.design.items()}
_CATEGORICAL = tuple(f.name for f in FEATURES if f.categorical)


class DesignColumns:
    """Builds the classifier's input matrix from features, column by column as named.

    ``names`` is a manifest's ``feature_order``: each a numeric column some feature declares
    (model.features.FEATURES), or ``<feature>=<value>`` for a categorical feature, whose
    ``<feature>=__UNSEEN__`` column must be among them; else :class:`ArtifactError`.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._numeric: list[tuple[int, str, Callable[[np.ndarray], np.ndarray]]] = []
        self._one_hot: dict[str, dict[str, int]] = {}
        for position, name in enumerate(self.names):
            feature, _, value = name.partition("=")
            if name in _NUMERIC_BUILDERS:
                self._numeric.append((position, *_NUMERIC_BUILDERS[name]))
            elif value and feature in _CATEGORICAL:
                self._one_hot.setdefault(feature, {})[value] = position
            else:
                raise ArtifactError(
                    f"the manifest's feature_order names the column {name!r}, which this "
                    f"version cannot build; known: {', '.join(_NUMERIC_BUILDERS)} and "
                    f"{', '.join(f'{c}=<value>' for c in _CATEGORICAL)}. Retrain with this "
                    "version, or score with the version that trained it.")
        for feature, columns in self._one_hot.items():
            if UNSEEN_STATUS not in columns:
                raise ArtifactError(f"the manifest's feature_order has no {feature}="
                                    f"{UNSEEN_STATUS} column, so an unknown {feature} has no "
                                    "encoding")

    def vocabulary(self, feature: str) -> list[str]:
        """The one-hot vocabulary of a categorical feature, in column order."""
        return list(self._one_hot.get(feature, {}))

    def build(self, features: FeatureBatch) -> np.ndarray:
        """float32 (len(features), len(names)): the named columns in order; per categorical
        feature, exactly one of its columns is 1.0 per row."""
        n = len(features)
        matrix = np.zeros((n, len(self.names)), dtype=np.float32)
        rows = np.arange(n)
        for position, feature, build in self._numeric:
            matrix[:, position] = build(features.columns[feature])
        for feature, index in self._one_hot.items():
            unseen = index[UNSEEN_STATUS]
            positions = np.fromiter((index.get(v, unseen) for v in features.columns[feature]),
                                    dtype=np.int64, count=n)
            matrix[rows, positions] = 1.0
        return matrix


def import_xgboost_for_serving() -> None:
    """Import xgboost with scikit-learn hidden from it, in a process that only serves.

    xgboost imports scikit-learn, when it is installed, for its optional estimator classes
    (``XGBClassifier``); scikit-learn in turn imports SciPy's statistics: about 1.2 s and
    60 MB of a worker's start for classes it never uses, since it predicts with the booster
    (:meth:`Model.predict_proba`). Call this first thing in a worker process; scikit-learn
    itself stays importable (a hook may use it), only xgboost's estimators are unusable in that
    process, so never in a process that trains. A no-op once xgboost is imported.
    """
    if "xgboost" in sys.modules:
        return
    hidden = "sklearn" not in sys.modules
    if hidden:
        sys.modules["sklearn"] = None  # type: ignore[assignment]  # ImportError on import
    try:
        import xgboost  # noqa: F401
    finally:
        if hidden:
            del sys.modules["sklearn"]


SMALL_CALL_ROWS = 8  # a predict call of at most this many rows uses the row memo
MEMO_ROWS = 4_096  # design rows a Model's memo keeps: about 1.7 MB in all (tracemalloc)


class RowMemo:
    """Probabilities of design rows seen before, keyed by the float32 row's bytes; the least
    recently used row goes once ``rows`` are kept. The probabilities sit in one float32
    (rows, width) array; the memo holds no reference to the model it serves.

    Exact for a deterministic predictor: xgboost gives a row the same float32 probabilities
    alone as in any batch (tests/test_artifact.py holds it), so an answer from the memo is the
    one a call would give."""

    def __init__(self, rows: int, width: int) -> None:
        self.slots: OrderedDict[bytes, int] = OrderedDict()
        self.proba = np.empty((rows, width), dtype=np.float32)
        self.misses = 0  # rows that were predicted rather than remembered

    def predict(self, matrix: np.ndarray, predict: Callable[[np.ndarray], np.ndarray]
                ) -> np.ndarray:
        """float32 (n, width) probabilities of the native float32 ``matrix``: remembered rows
        from the memo, the others from one ``predict`` call over them, then remembered."""
        out = np.empty((len(matrix), self.proba.shape[1]), dtype=np.float32)
        keys = [row.tobytes() for row in matrix]
        missing = []
        for i, key in enumerate(keys):
            slot = self.slots.get(key)
            if slot is None:
                missing.append(i)
            else:
                self.slots.move_to_end(key)
                out[i] = self.proba[slot]
        if missing:
            fresh = predict(matrix[missing])
            out[missing] = fresh
            self.misses += len(missing)
            for i, proba in zip(missing, fresh, strict=True):
                self._remember(keys[i], proba)
        return out

    def _remember(self, key: bytes, proba: np.ndarray) -> None:
        if key in self.slots:  # the same row twice in one call
            return
        if len(self.slots) < len(self.proba):
            slot = len(self.slots)
        else:
            _, slot = self.slots.popitem(last=False)
        self.slots[key] = slot
        self.proba[slot] = proba


@dataclass
class Model:
    """A loaded artifact: the booster and its manifest. Predicts with the booster's in-place
    prediction on the float32 design matrix (what ``XGBClassifier.predict_proba`` calls for a
    dense array, without the estimator around it)."""

    booster: Booster
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        names = self.manifest.get("feature_order")
        if not names:
            raise ArtifactError("the manifest has no feature_order: cannot build the design "
                                "matrix")
        self.columns = DesignColumns(names)
        for feature, vocabulary in self.manifest["categories"].items():
            if self.columns.vocabulary(feature) != vocabulary:
                raise ArtifactError(
                    f"the manifest's feature_order one-hot {feature} columns "
                    f"{self.columns.vocabulary(feature)} differ from its {feature} vocabulary "
                    f"{vocabulary}")
        self.classes = np.array(self.manifest["classes"], dtype=object)
        self.memo = RowMemo(MEMO_ROWS, len(self.classes))

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def windowed(self) -> tuple[str, ...]:
        """The windowed features the model reads (design columns named after them), in
        declaration order: the scorer joins the feature stage's values only for a model that
        reads some (scoring/windowed.py)."""
        return tuple(name for name in WINDOWED_NAMES if name in self.columns.names)

    def design_matrix(self, features: FeatureBatch) -> np.ndarray:
        """float32 (len(features), len(feature_order)), columns as the manifest names them."""
        return self.columns.build(features)

    def predict_proba(self, features: FeatureBatch) -> np.ndarray:
        """float32 probabilities, one column per entry of ``classes``."""
        if len(features) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return self.predict_matrix(self.design_matrix(features))

    def predict_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """float32 (n, len(classes)) probabilities for a (n, len(feature_order)) design matrix
        (converted to native float32 if it is not).

        A call of at most ``SMALL_CALL_ROWS`` rows (one HTTP order, a worker's batch under
        light load) is answered through this Model's :class:`RowMemo`: xgboost spends about
        250 us setting up a call whatever its rows, while design rows repeat (hour x in_stock
        x zip x payment status is about 1,000 rows). A new version starts with a memo of its
        own."""
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if len(matrix) <= SMALL_CALL_ROWS:
            return self.memo.predict(matrix, self._predict)
        return self._predict(matrix)

    def _predict(self, matrix: np.ndarray) -> np.ndarray:
        proba = self.booster.inplace_predict(matrix)
        return np.asarray(proba, dtype=np.float32).reshape(len(matrix), len(self.classes))

    def predict(self, features: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        """(recommendation per order, probabilities)."""
        proba = self.predict_proba(features)
        return self.classes[proba.argmax(axis=1)], proba


def save(classifier: XGBClassifier, manifest: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the model and its manifest; the version is derived from the model's own hash."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    classifier.save_model(model_path)
    digest = sha256_of(model_path)
    manifest = {
        "format": FORMAT,
        "version": f"xgb-{digest[:12]}",
        **manifest,
        "model_file": MODEL_FILE,
        "files": {MODEL_FILE: digest},
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / MANIFEST)
    return out_dir / MANIFEST


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found: is {model_dir} a model directory "
                            "written by `triage train`?") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return manifest


def verify(model_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every file it lists has the sha256 it records."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    for name, expected in manifest["files"].items():
        path = model_dir / name
        if Path(name).name != name:
            raise ArtifactError(f"manifest lists {name!r}, which is outside the model directory")
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing")
        actual = sha256_of(path)
        if actual != expected:
            raise ArtifactError(
                f"{path} has sha256 {actual}, but the manifest records {expected}: the file "
                "was changed after training. Refusing to load it; retrain or restore it.")
    return manifest


def load(model_dir: str | Path, n_threads: int = 1) -> Model:
    """The verified artifact in ``model_dir``, predicting on ``n_threads`` threads.

    Raises :class:`ArtifactError` for a changed or missing file, a design column this version
    cannot build, or a model fitted on another number of columns than the manifest names."""
    import xgboost

    manifest = verify(model_dir)
    booster = xgboost.Booster(params={"nthread": n_threads},
                              model_file=str(Path(model_dir) / manifest["model_file"]))
    model = Model(booster, manifest)
    fitted = booster.num_features()
    if fitted != len(model.columns.names):
        raise ArtifactError(f"{model_dir}: the model was fitted on {fitted} columns, but the "
                            f"manifest's feature_order names {len(model.columns.names)}")
    return model
