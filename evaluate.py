"""Score any text with a trained model: loss, perplexity and bits per byte.

python evaluate.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt data.path=other.txt
"""

import hydra
from omegaconf import DictConfig

from lmlab.cli import register_resolvers, user_errors
from lmlab.run.evaluate import evaluate_from_config

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors
def main(cfg: DictConfig) -> None:
    evaluate_from_config(cfg)


if __name__ == "__main__":
    main()
