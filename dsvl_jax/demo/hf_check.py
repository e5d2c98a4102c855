"""The conversion end to end: our params → an HF-port folder → transformers answers a held-out question.

The folder holds the safetensors weights, `config.json`, the tokenizer files and `processor_config.json`,
so transformers needs nothing from this package: `AutoProcessor` + `DeepseekVLHybridForConditionalGeneration`
from the folder, a greedy `generate`. The same question goes through our `Processor` + `VLM.generate`.

The two processors differ by design in one place (the SigLIP view: PIL uint8 bilinear in transformers,
a float antialiased resize in the official code and here, ≤ 2/255 apart), so the answers are compared as
strings and, on identical inputs (our pixel arrays fed to the torch model), as token ids.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from dsvl_jax import tasks
from dsvl_jax.convert.export import save_pretrained
from dsvl_jax.demo.evaluate import prompt
from dsvl_jax.processing import image as image_ops
from dsvl_jax.processing.processor import Processor, write_hf_processor_config
from dsvl_jax.runtime import VLM


@dataclasses.dataclass
class HFAnswer:
    question: str
    expected: str  # the suite's answer
    ours: str  # our Processor + VLM.generate
    transformers: str  # AutoProcessor + transformers generate, from the exported folder alone
    ours_ids: list
    transformers_ids: list  # transformers generate on our exact inputs (ids and pixel arrays)
    max_logit_diff: float  # max |ours - transformers| over the prompt's logits, on our exact inputs

    @property
    def same_answer(self) -> bool:
        return self.ours == self.transformers

    @property
    def same_tokens(self) -> bool:
        return self.ours_ids == self.transformers_ids


def export(vlm: VLM, tokenizer_dir: str, path: str) -> str:
    """HF-port folder of `vlm` (float32) with the tokenizer and the processor config beside the weights."""
    out = save_pretrained(vlm, path, layout="hf", overwrite=True, side_files_from=tokenizer_dir)
    write_hf_processor_config(out, vlm.config)
    return out


def _strip(tokenizer, ids) -> tuple[list, str]:
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    return ids, tokenizer.decode(ids).strip()


def answer_with_transformers(folder: str, vlm: VLM, processor: Processor, example: tasks.Example,
                             max_new_tokens: int = 6) -> HFAnswer:
    import torch
    import transformers

    tok = processor.tokenizer
    conv = prompt(example)
    ours = processor(conv)
    new = vlm.generate(ours["input_ids"], pixel_values=ours["pixel_values"],
                       high_res_pixel_values=ours["high_res_pixel_values"], max_new_tokens=max_new_tokens,
                       eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    ours_ids, ours_text = _strip(tok, np.asarray(new)[0])

    model = transformers.DeepseekVLHybridForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(folder)
    image = image_ops.to_rgb(example.image, processor.background)
    inputs = hf_proc(text=[processor.format(conv)], images=[image], return_tensors="pt")
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    with torch.no_grad():
        out = model.generate(**inputs, **gen)
        same_inputs = model.generate(input_ids=torch.from_numpy(ours["input_ids"]).long(),
                                     attention_mask=torch.from_numpy(ours["attention_mask"]).long(),
                                     pixel_values=torch.from_numpy(ours["pixel_values"]),
                                     high_res_pixel_values=torch.from_numpy(ours["high_res_pixel_values"]), **gen)
        theirs_logits = model(input_ids=torch.from_numpy(ours["input_ids"]).long(),
                              pixel_values=torch.from_numpy(ours["pixel_values"]),
                              high_res_pixel_values=torch.from_numpy(ours["high_res_pixel_values"])).logits.numpy()
    ours_logits = np.asarray(vlm(ours["input_ids"], pixel_values=ours["pixel_values"],
                                 high_res_pixel_values=ours["high_res_pixel_values"]))
    _, hf_text = _strip(tok, out[0, inputs["input_ids"].shape[1]:].numpy())
    hf_ids, _ = _strip(tok, same_inputs[0, ours["input_ids"].shape[1]:].numpy())
    return HFAnswer(example.question, example.answer, ours_text, hf_text, ours_ids, hf_ids,
                    float(np.abs(ours_logits - theirs_logits).max()))


def transformers_available() -> str | None:
    """None when transformers + torch import, else why not."""
    try:
        import torch  # noqa: F401
        import transformers
        transformers.DeepseekVLHybridForConditionalGeneration  # noqa: B018
    except (ImportError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def folder_files(folder: str) -> list[str]:
    return sorted(os.listdir(folder))
