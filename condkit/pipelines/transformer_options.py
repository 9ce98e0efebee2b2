"""The generation options only SD3 and Flux pipelines have: true CFG for Flux negatives, T5's max_sequence_length.

    call_kwargs = transformer_call_options(pipe, requests, true_cfg_scale=2.0)
    generate(pipe, conditioner, requests, settings, **call_kwargs)

Flux is guidance-distilled: `guidance_scale` (condkit's --guidance) is an input of the transformer, not CFG,
and a negative prompt takes effect only with `true_cfg_scale > 1`, which runs real CFG (a second
transformer call per step). A negative prompt without it is not an error: it is kept in the requests and
their metadata but does not change the images, and this says so once.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)


def takes_argument(pipe: Any, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def is_t5_pipeline(pipe: Any) -> bool:
    """SD3 or Flux: a transformer pipeline with a T5 encoder slot."""
    return getattr(pipe, "transformer", None) is not None and takes_argument(pipe, "max_sequence_length")


def check_max_sequence_length(pipe: Any, max_sequence_length: int | None) -> None:
    if max_sequence_length is not None and not is_t5_pipeline(pipe):
        raise ValueError(
            f"--max-sequence-length {max_sequence_length} applies to SD3 and Flux pipelines (T5 tokens); "
            f"this model is a {type(pipe).__name__}"
        )


def check_true_cfg_scale_before_loading(model: str | None, true_cfg_scale: float | None) -> None:
    """Refuse --true-cfg-scale before anything loads when the pipeline class is known from disk: the embedded
    model (model None) or a local folder's model_index.json. Hub ids and single files are checked after loading."""
    if true_cfg_scale is None:
        return
    if model is None:
        class_name = "StableDiffusionPipeline"  # the embedded shapes-world model
    else:
        index = Path(model) / "model_index.json"
        if not index.is_file():
            return
        class_name = json.loads(index.read_text()).get("_class_name", "")
    import diffusers

    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is not None and not takes_argument(pipeline_class, "true_cfg_scale"):
        raise ValueError(f"--true-cfg-scale applies to Flux pipelines (their negatives need it); this model is a {class_name}, "
                         "whose CFG scale is --guidance")


def transformer_call_options(pipe: Any, requests: Iterable[Any], true_cfg_scale: float | None = None) -> dict[str, Any]:
    """The extra pipeline-call arguments for `true_cfg_scale` (validated against `pipe`), warning once when
    Flux negatives would be ignored."""
    takes_true_cfg = takes_argument(pipe, "true_cfg_scale")
    if true_cfg_scale is not None and not takes_true_cfg:
        raise ValueError(
            f"--true-cfg-scale applies to Flux pipelines (their negatives need it); this model is a {type(pipe).__name__}, "
            "whose CFG scale is --guidance"
        )
    if not takes_true_cfg:
        return {}
    with_negative = sum(1 for request in requests if request.negative_prompt is not None)
    if with_negative and (true_cfg_scale is None or true_cfg_scale <= 1):
        logger.warning(
            f"{type(pipe).__name__} ignores negative prompts unless --true-cfg-scale is above 1 (real CFG, a second "
            f"transformer call per step): the negative prompt of {with_negative} request(s) does not change the images"
        )
    return {} if true_cfg_scale is None else {"true_cfg_scale": true_cfg_scale}
