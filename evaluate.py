"""Score any text with a trained model: loss, perplexity and bits per byte; or run lm-evaluation-harness tasks.

python evaluate.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt data.path=other.txt
python evaluate.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt harness.tasks=[lambada_openai,hellaswag]
python evaluate.py ckpt=... data.path=... verify_checkpoint_hash=false  # a very large checkpoint: skip re-hashing its tensors
"""

import hydra
from omegaconf import DictConfig

from lmlab.cli import register_resolvers, user_errors
from lmlab.run.evaluate import evaluate_from_config

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    if cfg.harness.tasks:
        from lmlab.harness.run import harness_from_config  # lm_eval is an optional extra

        harness_from_config(cfg)
    else:
        evaluate_from_config(cfg)


if __name__ == "__main__":
    main()
