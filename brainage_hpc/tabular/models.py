"""scikit-learn models for the FreeSurfer table, and their search on the validation split.

Every model is a :class:`~sklearn.pipeline.Pipeline` whose first step is
``SimpleImputer(strategy="median")``: missing cells are filled with the median
of the *training* split, learnt inside ``fit`` so no validation/test value leaks
in. Linear models add a ``StandardScaler``. Class imbalance (the 36+ bin is ~1 %
of HCP) is handled by ``class_weight="balanced"`` or, for XGBoost, by balanced
sample weights.

Models (``--model``):

* ``hgb``: HistGradientBoosting (default; the seed's best result was gradient boosting);
* ``rf``: random forest (has impurity importance);
* ``linear``: logistic regression (classification) or ridge (regression) on standardised features;
* ``xgb``, ``lgbm``: XGBoost / LightGBM, only when the package is installed;
* ``two-step`` (``classify4`` only): the seed's model, a detector for the rare 36+ bin
  (one-vs-rest logistic regression, or an IsolationForest outlier detector), then a
  3-class gradient-boosting model for the other bins, see :class:`TwoStepClassifier`.

The search samples ``n_iter`` settings (seeded ``ParameterSampler``) besides the
defaults, fits each on the training split and keeps the best on the validation
split (balanced accuracy for classification, MAE for regression). The returned
model is the one fitted on the training split only, so the validation split
stays usable for the regression bias correction.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    IsolationForest,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import ParameterSampler
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from brainage_hpc.evaluation.metrics import classification_metrics, regression_metrics

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "SearchResult",
    "TwoStepClassifier",
    "build_model",
    "fit_model",
    "search_on_validation",
    "selection_score",
]

log = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("hgb", "rf", "linear", "xgb", "lgbm", "two-step")
_OPTIONAL = {"xgb": "xgboost", "lgbm": "lightgbm"}


@dataclass
class ModelSpec:
    """An unfitted pipeline and the hyper-parameters the search may try.

    Attributes:
        name: model name (one of :data:`MODEL_NAMES`).
        pipeline: ``imputer -> [scaler] -> model`` (step names ``impute``, ``scale``, ``model``).
        param_space: pipeline parameter name -> list of candidate values.
        needs_sample_weight: pass balanced sample weights to ``fit`` (models without ``class_weight``).
    """

    name: str
    pipeline: Pipeline
    param_space: dict[str, list[Any]]
    needs_sample_weight: bool = False


class TwoStepClassifier(ClassifierMixin, BaseEstimator):
    """The seed's two-step model: detect the rare class first, classify the rest.

    Step 1 flags subjects of ``rare_class`` (36+) with a ``detector``:
    ``"classifier"`` is a class-balanced one-vs-rest logistic regression on standardised
    features (it uses the labels); ``"isolation-forest"`` is an unsupervised
    IsolationForest whose contamination is the rare fraction of the training set (it
    flags whatever is atypical). Step 2 is ``classifier`` trained on the other classes.

    Args:
        classifier: estimator for the non-rare classes (default: class-balanced HistGradientBoosting).
        detector: ``"classifier"`` or ``"isolation-forest"``.
        rare_class: label of the rare class.
        random_state: seed of both steps.
    """

    def __init__(
        self,
        classifier: BaseEstimator | None = None,
        detector: Literal["classifier", "isolation-forest"] = "classifier",
        rare_class: int = 3,
        random_state: int = 0,
    ) -> None:
        self.classifier = classifier
        self.detector = detector
        self.rare_class = rare_class
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray) -> TwoStepClassifier:
        """Fit both steps. X: (N, F) features without NaN; y: (N,) class indices."""
        X = np.asarray(X, dtype=float)
        y = np.asarray(y)
        rare = y == self.rare_class
        self.classes_ = np.unique(y)
        self.n_rare_ = int(rare.sum())
        if self.detector == "classifier":
            det: BaseEstimator | None = None
            if 0 < self.n_rare_ < len(y):
                det = Pipeline(
                    [
                        ("scale", StandardScaler()),
                        ("model", LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000)),
                    ]
                ).fit(X, rare.astype(int))
        elif self.detector == "isolation-forest":
            det = None
            if self.n_rare_ > 0:
                contamination = min(max(self.n_rare_ / len(y), 1e-3), 0.5)
                det = IsolationForest(contamination=contamination, random_state=self.random_state).fit(X)
        else:
            raise ValueError(f"detector must be 'classifier' or 'isolation-forest', got '{self.detector}'")
        self.detector_ = det
        base = self.classifier if self.classifier is not None else _hgb_classifier(self.random_state)
        rest = ~rare if self.n_rare_ < len(y) else np.ones_like(rare)
        self.classifier_ = clone(base).fit(X[rest], y[rest])
        return self

    def _rare_mask(self, X: np.ndarray) -> np.ndarray:
        if self.detector_ is None:
            return np.zeros(len(X), dtype=bool)
        if self.detector == "classifier":
            return self.detector_.predict(X) == 1
        return self.detector_.predict(X) == -1  # IsolationForest: -1 = outlier

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class indices, shape (N,)."""
        X = np.asarray(X, dtype=float)
        out = np.asarray(self.classifier_.predict(X)).copy()
        out[self._rare_mask(X)] = self.rare_class
        return out


def _hgb_classifier(seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(class_weight="balanced", random_state=seed)


def _imputer() -> SimpleImputer:
    # keep_empty_features: a column empty on the training split stays (as 0) so feature names line up
    return SimpleImputer(strategy="median", keep_empty_features=True)


def _optional_model(name: str, classify: bool, seed: int, n_jobs: int) -> tuple[Any, dict[str, list[Any]], bool]:
    package = _OPTIONAL[name]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"--model {name} needs the '{package}' package (pip install {package}); or use --model hgb")
    if name == "xgb":
        import xgboost

        cls = xgboost.XGBClassifier if classify else xgboost.XGBRegressor
        est = cls(
            n_estimators=300, learning_rate=0.05, max_depth=4, random_state=seed, n_jobs=n_jobs, tree_method="hist"
        )
        xgb_space: dict[str, list[Any]] = {
            "model__n_estimators": [100, 300, 600],
            "model__max_depth": [2, 3, 4, 6],
            "model__learning_rate": [0.02, 0.05, 0.1, 0.2],
            "model__subsample": [0.7, 0.85, 1.0],
            "model__colsample_bytree": [0.5, 0.8, 1.0],
        }
        return est, xgb_space, classify
    import lightgbm

    kwargs: dict[str, Any] = {"random_state": seed, "n_jobs": n_jobs, "verbose": -1, "deterministic": True}
    est = lightgbm.LGBMClassifier(class_weight="balanced", **kwargs) if classify else lightgbm.LGBMRegressor(**kwargs)
    lgbm_space: dict[str, list[Any]] = {
        "model__n_estimators": [100, 300, 600],
        "model__num_leaves": [7, 15, 31],
        "model__learning_rate": [0.02, 0.05, 0.1],
        "model__min_child_samples": [5, 10, 20],
    }
    return est, lgbm_space, False


def build_model(name: str, task: str, seed: int = 0, n_jobs: int = 1) -> ModelSpec:
    """Pipeline and search space of model ``name`` for ``task``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        task: ``classify4``, ``classify2`` or ``regress``.
        seed: random state of the model.
        n_jobs: threads for random forest / XGBoost / LightGBM.

    Raises:
        ValueError: unknown name, ``two-step`` on a task other than ``classify4``, or a
            missing optional package.
    """
    if task not in ("classify4", "classify2", "regress"):
        raise ValueError(f"unknown task '{task}' (valid: classify4, classify2, regress)")
    if name not in MODEL_NAMES:
        import difflib

        hint = difflib.get_close_matches(name, MODEL_NAMES, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ValueError(f"unknown model '{name}'.{did_you_mean} Valid: {', '.join(MODEL_NAMES)}")
    classify = task != "regress"
    space: dict[str, list[Any]]
    scale = False
    weights = False
    if name == "hgb":
        est: Any = _hgb_classifier(seed) if classify else HistGradientBoostingRegressor(random_state=seed)
        space = {
            "model__learning_rate": [0.03, 0.05, 0.1, 0.2],
            "model__max_iter": [100, 200, 400],
            "model__max_leaf_nodes": [7, 15, 31],
            "model__min_samples_leaf": [5, 10, 20],
            "model__l2_regularization": [0.0, 0.1, 1.0],
        }
    elif name == "rf":
        common = {"n_estimators": 300, "random_state": seed, "n_jobs": n_jobs}
        est = RandomForestClassifier(class_weight="balanced", **common) if classify else RandomForestRegressor(**common)
        space = {
            "model__n_estimators": [200, 300, 500],
            "model__max_depth": [None, 4, 8, 16],
            "model__min_samples_leaf": [1, 2, 4],
            "model__max_features": ["sqrt", 0.3, 0.6, 1.0],
        }
    elif name == "linear":
        scale = True
        if classify:
            est = LogisticRegression(class_weight="balanced", max_iter=5000)
            space = {"model__C": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]}
        else:
            est = Ridge()
            space = {"model__alpha": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0]}
    elif name == "two-step":
        if task != "classify4":
            raise ValueError(f"--model two-step separates the 36+ bin and needs --task classify4, got {task}")
        est = TwoStepClassifier(classifier=_hgb_classifier(seed), random_state=seed)
        space = {
            "model__detector": ["classifier", "isolation-forest"],
            "model__classifier__learning_rate": [0.03, 0.05, 0.1, 0.2],
            "model__classifier__max_leaf_nodes": [7, 15, 31],
            "model__classifier__min_samples_leaf": [5, 10, 20],
        }
    else:
        est, space, weights = _optional_model(name, classify, seed, n_jobs)
    steps: list[tuple[str, Any]] = [("impute", _imputer())]
    if scale:
        steps.append(("scale", StandardScaler()))
    steps.append(("model", est))
    return ModelSpec(name=name, pipeline=Pipeline(steps), param_space=space, needs_sample_weight=weights)


def fit_model(spec: ModelSpec, params: dict[str, Any], X: np.ndarray, y: np.ndarray) -> Pipeline:
    """Clone ``spec.pipeline``, set ``params`` and fit it on (X (N, F), y (N,))."""
    pipe = clone(spec.pipeline).set_params(**params)
    fit_params = {}
    if spec.needs_sample_weight:
        fit_params["model__sample_weight"] = compute_sample_weight("balanced", y)
    return pipe.fit(X, y, **fit_params)


def selection_score(task: str, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int | None) -> tuple[str, float]:
    """Validation score used to pick hyper-parameters, as ``(name, value)``; higher is better."""
    if n_classes is None:
        return "neg_mae", -regression_metrics(y_true, y_pred)["mae"]
    return "balanced_accuracy", classification_metrics(y_true, y_pred, n_classes)["balanced_accuracy"]


@dataclass
class SearchResult:
    """Outcome of :func:`search_on_validation`.

    Attributes:
        model: best pipeline, fitted on the training split.
        params: its hyper-parameters (``{}`` = the defaults).
        score_name: ``balanced_accuracy`` or ``neg_mae`` (higher is better).
        val_score: its validation score (NaN when there was no validation split).
        trials: every tried setting with its validation score, in order.
    """

    model: Pipeline
    params: dict[str, Any]
    score_name: str
    val_score: float
    trials: list[dict[str, Any]] = field(default_factory=list)


def search_on_validation(
    spec: ModelSpec,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int | None,
    n_iter: int = 10,
    seed: int = 0,
) -> SearchResult:
    """Seeded random search: defaults + ``n_iter`` sampled settings, best on validation.

    Args:
        spec: from :func:`build_model`.
        X_train, y_train: (N_train, F) features, (N_train,) targets.
        X_val, y_val: (N_val, F), (N_val,); with N_val = 0 the defaults are used unsearched.
        n_classes: number of classes, or ``None`` for regression.
        n_iter: number of sampled settings (0: defaults only).
        seed: seed of the sampler.

    Returns:
        :class:`SearchResult`; ties keep the earlier trial (the defaults come first).
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    task = "regress" if n_classes is None else "classify"
    candidates: list[dict[str, Any]] = [{}]
    if len(y_val) and n_iter:
        grid_size = int(np.prod([len(v) for v in spec.param_space.values()]))
        sampler = ParameterSampler(spec.param_space, n_iter=min(n_iter, grid_size), random_state=seed)
        candidates += list(sampler)
    elif n_iter and not len(y_val):
        log.warning("no validation subjects: hyper-parameter search skipped, defaults used")
    candidates = _fit_leaf_sizes(spec, candidates, len(y_train))
    best: tuple[float, int, Pipeline] | None = None
    trials: list[dict[str, Any]] = []
    score_name = "neg_mae" if n_classes is None else "balanced_accuracy"
    for i, params in enumerate(candidates):
        model = fit_model(spec, params, X_train, y_train)
        score = float("nan")
        if len(y_val):
            score_name, score = selection_score(task, y_val, model.predict(X_val), n_classes)
        trials.append({"params": _plain(params), score_name: score})
        log.debug("trial %d %s: %s=%.4f", i, params, score_name, score)
        if best is None or score > best[0]:
            best = (score, i, model)
    assert best is not None  # candidates is never empty
    return SearchResult(
        model=best[2], params=_plain(candidates[best[1]]), score_name=score_name, val_score=best[0], trials=trials
    )


def _fit_leaf_sizes(spec: ModelSpec, candidates: list[dict[str, Any]], n_train: int) -> list[dict[str, Any]]:
    """Cap every ``min_samples_leaf`` at ``n_train // 4`` (at least 1), defaults included.

    Why: with 24 training subjects, HistGradientBoosting's default leaf size of 20
    allows no split at all, so the "model" is the training mean and ties the
    baseline exactly, a result that looks like a model and is not one.
    """
    cap = max(1, n_train // 4)
    defaults = spec.pipeline.get_params()
    keys = [k for k in defaults if k.endswith("min_samples_leaf")]
    out: list[dict[str, Any]] = []
    for params in candidates:
        fixed = dict(params)
        for key in keys:
            value = fixed.get(key, defaults[key])
            if isinstance(value, (int, np.integer)) and value > cap:
                fixed[key] = cap
        if fixed not in out:
            out.append(fixed)
    if out != candidates:
        log.info("min_samples_leaf capped at %d for %d training subjects", cap, n_train)
    return out


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
