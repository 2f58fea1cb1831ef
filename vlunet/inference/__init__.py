"""Inference: the one engine behind vlunet-restore, vlunet-app and vlunet-test's forward (and its ONNX Runtime
twin for exported models, :mod:`vlunet.inference.onnx_backend`)."""
from vlunet.inference.conditioning import TEXT_PROMPT_MODES, Conditioner, text_codes_from_options  # noqa: F401
from vlunet.inference.engine import (PRECISIONS, Restoration, RestorationEngine, WeightsError,  # noqa: F401
                                     check_precision, describe_mismatch, load_weights, parse_precision,
                                     precision_name, precision_problem)
from vlunet.inference.memory import MemoryBudgetError, format_bytes, parse_memory  # noqa: F401
