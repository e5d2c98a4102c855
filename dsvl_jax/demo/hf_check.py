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
from dsvl_jax.demo.data import SYSTEM_PROMPT
from dsvl_jax.demo.evaluate import prompt
from dsvl_jax.processing import image as image_ops
from dsvl_jax.processing.chat import format_prompt
from dsvl_jax.processing.processor import Processor
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
    """HF-port folder of `vlm` (float32) with the tokenizer, processor config and chat template beside the
    weights (what every `save_pretrained(layout="hf")` writes)."""
    return save_pretrained(vlm, path, layout="hf", overwrite=True, side_files_from=tokenizer_dir)


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


def score_with_transformers(folder: str, examples, *, max_new_tokens: int = 6, system_prompt: str | None = None,
                            batch_size: int = 16) -> list[str]:
    """Greedy answers of the exported folder alone (transformers `AutoProcessor` + `AutoModelForImageTextToText`,
    float32) to each example's plain prompt: the system prompt, the image and the question.

    The prompt is the folder's chat template when it ships one, else the same `deepseek` format string that
    `answer_with_transformers` feeds the HF processor (`Processor.format` of `evaluate.prompt`). The batch is
    left-padded with the tokenizer's pad id (the exported tokenizer pads left with EOS); answers are cut at the
    first EOS and decoded without special tokens, as `evaluate.answer` decodes ours. `system_prompt=None` is the
    demo's (`data.SYSTEM_PROMPT`, what `run.py`'s `Processor` uses); "" is none.
    """
    import torch
    import transformers

    if system_prompt is None:
        system_prompt = SYSTEM_PROMPT
    hf_proc = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = hf_proc.tokenizer
    hf_tok.padding_side = "left"
    eos = hf_tok.eos_token_id
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos
    ip = hf_proc.image_processor
    background = tuple(int(c) for c in (getattr(ip, "high_res_background_color", None) or ip.background_color))

    def text(example) -> str:
        if getattr(hf_proc, "chat_template", None):
            messages = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
                        if system_prompt else [])
            messages.append({"role": "user",
                             "content": [{"type": "image"}, {"type": "text", "text": example.question}]})
            return hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return format_prompt(prompt(example), system_prompt=system_prompt)

    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out: list[str] = []
    examples = list(examples)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs = hf_proc(text=[text(e) for e in chunk], images=[image_ops.to_rgb(e.image, background) for e in chunk],
                         padding=True, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:].numpy()
        for row in new:
            ids = row.tolist()
            if eos in ids:
                ids = ids[:ids.index(eos)]
            out.append(hf_tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip())
    return out
