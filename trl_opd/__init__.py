"""trl_opd: on-policy distillation methods as a TRL extension.

The pure tensor functions (``trl_opd.losses``, ``trl_opd.weighting``, ...) import without TRL;
the trainers are imported lazily so that ``import trl_opd`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "OPDConfig": "trl_opd.trainers.opd_config",
    "OPDTrainer": "trl_opd.trainers.opd_trainer",
    "SimCTConfig": "trl_opd.trainers.simct_config",
    "SimCTTrainer": "trl_opd.trainers.simct_trainer",
    "RLADConfig": "trl_opd.trainers.rlad_config",
    "RLADTrainer": "trl_opd.trainers.rlad_trainer",
    "ForesightCallback": "trl_opd.callbacks",
    "monosoup": "trl_opd.merge",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_opd' has no attribute {name!r}")
