"""lm_eval's command line with the `lmlab` model registered:

python -m lmlab.harness run --model lmlab --model_args ckpt=outputs/runs/<run>/checkpoints/last.ckpt --tasks lambada_openai

`--model_args ckpt=...,verify_checkpoint_hash=false` skips checking the checkpoint's tensors against
their stored hash (for very large checkpoints), as `verify_checkpoint_hash=false` does for evaluate.py.
"""

from lm_eval.__main__ import cli_evaluate

import lmlab.harness  # noqa: F401  (registers the lmlab model)

if __name__ == "__main__":
    cli_evaluate()
