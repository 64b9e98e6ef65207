"""Image captioning backends behind one small interface.

A backend is anything with an ``id`` (a string that names the model *and* every setting that
changes its output; it goes into cache keys) and ``caption(images, prompts) -> texts``. The CLI in
:mod:`data_process.augment.caption` only talks to this interface, so another backend (an API model, a
different VLM) is one class away. :class:`Blip2Captioner` is the paper's backend (BLIP-2 OPT-2.7B).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from PIL import Image

from data_process.core.devices import resolve_device

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"

DTYPES = ("auto", "bf16", "fp16", "fp32")


@runtime_checkable
class Captioner(Protocol):
    """Turns images (+ one text prompt per image, ``""`` for a plain caption) into texts."""

    @property
    def id(self) -> str:  # model name/path + output-relevant settings; part of cache keys
        ...

    def caption(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        ...

    # Optional: ``prepare_image`` (a picklable ``Image -> Image``) is run by the decoding workers before
    # images reach ``caption``; it must not change the captions (e.g. the processor's own exact resize).


def resolve_dtype(dtype: str, device: str):
    """``auto`` -> bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def resize_exact(image: Image.Image, *, width: int, height: int, resample: int) -> Image.Image:
    """``image.resize((width, height), resample)``: module-level so it pickles into DataLoader workers."""
    return image.resize((width, height), resample=resample)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class GenerationSettings:
    num_beams: int = 1
    max_new_tokens: int = 30

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


class Blip2Captioner:
    """BLIP-2 (``Blip2ForConditionalGeneration``) loaded by hub name or local path.

    Greedy decoding by default (``num_beams=1``), so a caption does not depend on its batch. The
    processor prepends ``num_query_tokens`` image placeholder tokens to every prompt; the output is
    cut after the (left-padded) input, so neither placeholders nor the prompt appear in the text.
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto",
                 settings: GenerationSettings | None = None):
        import torch
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        self.model_name = str(model)
        self.device = str(resolve_device(device))
        self.dtype = resolve_dtype(dtype, self.device)
        self.settings = settings or GenerationSettings()
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_name)
            self.model = Blip2ForConditionalGeneration.from_pretrained(self.model_name, dtype=self.dtype)
        except OSError as exc:
            raise OSError(f"cannot load BLIP-2 model {self.model_name!r}: {exc}") from exc
        self.model.to(self.device).eval()
        self._prepare()
        self._torch = torch

    @classmethod
    def from_objects(cls, model: Any, processor: Any, *, name: str, settings: GenerationSettings | None = None
                     ) -> "Blip2Captioner":
        """Wrap an already built model + processor (benchmarks, tests)."""
        import torch

        self = cls.__new__(cls)
        self.model_name = name
        self.model = model.eval()
        self.processor = processor
        param = next(model.parameters())
        self.device = str(param.device)
        self.dtype = param.dtype
        self.settings = settings or GenerationSettings()
        self._torch = torch
        self._prepare()
        return self

    def _prepare(self) -> None:
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # decoder-only generation: pad on the left
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if getattr(self.model.config, "image_token_index", None) is None:
            raise ValueError(f"{self.model_name}: config has no image_token_index; transformers>=5 needs it "
                             "to place the Q-Former outputs")
        self.image_token = str(getattr(self.processor, "image_token", "<image>"))

    @property
    def prepare_image(self):
        """The processor's resize, done early in the decoding workers (bit-identical pixel values), when the
        image processor is the PIL BLIP one resizing to a fixed size; ``None`` otherwise."""
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        ip = self.processor.image_processor
        size = getattr(ip, "size", None)
        if not isinstance(ip, BlipImageProcessorPil) or not getattr(ip, "do_resize", False):
            return None
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        if not height or not width:
            return None
        return functools.partial(resize_exact, width=int(width), height=int(height), resample=int(ip.resample))

    @property
    def id(self) -> str:
        s = self.settings
        return f"blip2:{self.model_name}:beams={s.num_beams}:max_new_tokens={s.max_new_tokens}"

    def caption(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        torch = self._torch
        inputs = self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        s = self.settings
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, num_beams=s.num_beams,
                                      max_new_tokens=s.max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.replace(self.image_token, "").strip() for t in texts]
