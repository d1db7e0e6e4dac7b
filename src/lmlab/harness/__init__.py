"""lm-evaluation-harness on lmlab checkpoints: the `lmlab` model of lm_eval (any family, any tokenizer).

Importing this package registers the model with lm_eval (`pip install -e '.[harness]'`). lm_eval's
own command line finds only the models it ships, so `python -m lmlab.harness` is that command line
with `lmlab` registered: `python -m lmlab.harness run --model lmlab --model_args ckpt=... --tasks ...`.
"""

from lmlab.errors import ConfigError

try:
    from lmlab.harness.model import LmlabLM
except ModuleNotFoundError as err:
    if not (err.name or "").startswith("lm_eval"):
        raise
    raise ConfigError(
        "lm-evaluation-harness tasks need the lm_eval package, which is not installed: pip install -e '.[harness]'"
    ) from None

__all__ = ["LmlabLM"]
