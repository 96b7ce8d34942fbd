"""The MLflow vocabulary liverseg writes and reads: registered-model names, aliases and tag keys, each
defined once. MLflow's own keys (`mlflow.user`, `mlflow.parentRunId`, ...) come from `mlflow.utils.mlflow_tags`
where code needs them; the strings are repeated here only so that this module imports no MLflow.
"""

from __future__ import annotations

# ---------------------------------------------------------------- registered models and aliases
SERVED_MODEL = "liver-unet"  # what serving follows: models:/liver-unet@champion
CANDIDATES_SUFFIX = "-candidates"  # <name>-candidates holds every registered version (scientists add them)
CHAMPION, CHALLENGER = "champion", "challenger"  # the served version | the latest registered candidate


SERVED_EXPERIMENT = "liverseg-served"  # runs holding the served copies' files: only release users write there
SHADOW_EXPERIMENT = "liverseg-shadow"  # evidence runs of replicas shadowing a challenger (role `monitor`)


def candidate_model(name: str) -> str:
    """The registered model holding `name`'s candidate versions (alias `challenger`)."""
    return f"{name}{CANDIDATES_SUFFIX}"


def number(value: str | None) -> float | None:
    """A score read back from a tag: None when absent, empty or not a finite number (edited by hand)."""
    import math

    try:
        x = float(value) if value else None
    except (TypeError, ValueError):
        return None
    return x if x is not None and math.isfinite(x) else None


# ---------------------------------------------------------------- MLflow's own keys, as liverseg sets them
MLFLOW_USER = "mlflow.user"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_NOTE = "mlflow.note.content"  # a run's Markdown description

# ---------------------------------------------------------------- run tags
RUN_KEY = "liverseg.run_key"  # makes runs findable again (resume, no duplicates)
KIND = "liverseg.kind"  # tune | evaluation (training runs have none)
GIT_COMMIT = "git_commit"
DVC_STORE_MD5 = "dvc_store_md5"
STORE_PATH = "store_path"
STORE_DIGEST = "store_digest"
FORMAT_VERSION = "format_version"  # of the slice store trained on
RAY_VERSION, TORCH_VERSION = "ray_version", "torch_version"
CONFIG_HASH = "config_hash"
MODEL_URI = "model_uri"  # a finished training run's logged model
BEST_VAL_DICE, BEST_EPOCH = "best_val_dice", "best_epoch"
RAY_WORKER_NODES = "ray_worker_nodes"
TRIAL_STATUS = "trial_status"  # completed | early-stopped | failed
BEST_TRIAL_ID, BEST_RUN_ID = "best_trial_id", "best_run_id"  # on a search's parent run
BEST_PARAM_PREFIX = "best."  # best.<searched key> on a search's parent run
# a submitted job's run (a search's parent run, a training run): which Ray job, whose, and how it goes
JOB_ID = "liverseg.job.id"  # the Ray job's submission id
JOB_OWNER = "liverseg.job.owner"  # the MLflow login that submitted it (checked against the server)
JOB_STATE = "liverseg.job.state"  # what the driver is doing: running | waiting: <why>
JOB_OVERRIDES = "liverseg.job.overrides"  # the submitter's --set list, as JSON
JOB_CONFIG_SOURCE = "liverseg.job.config"  # stage file and profile the config came from
TRIALS_DONE, TRIALS_RUNNING, TRIALS_WAITING = "trials_done", "trials_running", "trials_waiting"  # parent metrics
# an evaluation run's link to what it scored
MODEL_NAME, MODEL_VERSION, TRAINING_RUN_ID = "model_name", "model_version", "training_run_id"
SPLIT, RESOLUTION = "split", "resolution"

# ---------------------------------------------------------------- model version tags
WEIGHTS_SHA256, SPEC_SHA256 = "liverseg.weights_sha256", "liverseg.spec_sha256"  # checked on every load
VAL_DICE = "val_dice"
TEST_DICE = "test_dice"  # the LiTS convention: mean over test volumes, each on its original grid
TEST_DICE_STORE_GRID = "test_dice_store_grid"  # a figure on the store's resampled grid, named as such
TEST_DICE_GRID, TEST_HD95, TEST_CASES = "test_dice_grid", "test_hd95_mm", "test_cases"
PROMOTION_DECISION, PROMOTION_REASON = "promotion_decision", "promotion_reason"
CHAMPION_TEST_DICE, COMPARED_WITH = "champion_test_dice", "compared_with"
DECIDED_AT, DECIDED_BY, PROMOTED_BY = "decided_at", "decided_by", "promoted_by"
CANDIDATE_VERSION, PREVIOUS_CHAMPION = "candidate_version", "previous_champion"  # on served copies
ROLLED_BACK_AT = "rolled_back_at"
CHAMPION_BY, CHAMPION_AT = "champion_by", "champion_at"
CHAMPION_FROM, CHAMPION_REASON = "champion_from", "champion_reason"
HISTORY_SEQ = "liverseg.history_seq"  # on a version made champion: the history record that did it
# the paired gate's decision (registry.gate), on the candidate and on the served copy it became
GATE_RULE, GATE_MARGIN, GATE_N_CASES = "gate.rule", "gate.margin", "gate.n_cases"
GATE_DIFF_MEAN, GATE_DIFF_CI_LOW, GATE_DIFF_CI_HIGH = "gate.diff_mean", "gate.diff_ci_low", "gate.diff_ci_high"
GATE_P_VALUE, GATE_SEED, GATE_RESAMPLES = "gate.p_value", "gate.seed", "gate.resamples"
GATE_CONFIDENCE = "gate.confidence"
GATE_TAGS = (GATE_RULE, GATE_MARGIN, GATE_N_CASES, GATE_DIFF_MEAN, GATE_DIFF_CI_LOW, GATE_DIFF_CI_HIGH)
GATE_TAGS += (GATE_P_VALUE, GATE_SEED, GATE_RESAMPLES, GATE_CONFIDENCE)

# ---------------------------------------------------------------- shadow evidence (serving)
# runs of a serving replica's shadow: a challenger version compared with the champion on real requests, one
# run per replica session; the `monitor` role (serving accounts that shadow) may EDIT this experiment only
SHADOW_KIND = "shadow"  # their KIND; MODEL_NAME / MODEL_VERSION name the challenger, COMPARED_WITH the champion
SHADOW_REPLICA = "shadow_replica"  # the replica that compared (host:port)
SHADOW_SINCE = "shadow_since"  # UTC time of its first comparison in this session
# what `liverseg promote` read of that evidence, recorded with its decision (candidate version, history record)
SHADOW_COMPARED, SHADOW_DICE_MEAN, SHADOW_DICE_P05 = "shadow.compared", "shadow.dice_mean", "shadow.dice_p05"
SHADOW_VOLUME_DIFF_MAX, SHADOW_EVIDENCE_SINCE = "shadow.volume_diff_ml_max", "shadow.since"

# ---------------------------------------------------------------- registered model tags
HISTORY_PREFIX = "liverseg.history."  # one per champion change: liverseg.history.<seq>, hash-chained
REQUEST_PREFIX = "liverseg.request."  # on <name>-candidates: one per approval request, liverseg.request.<seq>
