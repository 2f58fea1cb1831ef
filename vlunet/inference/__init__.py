"""Inference: the one engine behind vlunet-restore, vlunet-app and vlunet-test's forward."""
from vlunet.inference.conditioning import TEXT_PROMPT_MODES, Conditioner, text_codes_from_options  # noqa: F401
from vlunet.inference.engine import (PRECISIONS, Restoration, RestorationEngine, WeightsError,  # noqa: F401
                                     describe_mismatch, load_weights, parse_precision)
