"""`dsvl-chat`: talk to a DeepSeek-VL checkpoint from the terminal, answers streamed token by token.

    dsvl-chat --ckpt DIR --image a.png [--image b.png] "What is in the picture?"
    dsvl-chat --ckpt DIR                  # interactive: /image PATH, /reset, /help, /quit
    dsvl-chat --ckpt DIR --image a.png --json "question"   # token ids + timings as JSON

DIR is any checkpoint folder `load_pretrained` reads with its tokenizer: an HF-port or official-layout
folder (tokenizer files beside config.json) or an Orbax training checkpoint (the workdir, its
checkpoints dir or a step dir; the trainer copies the tokenizer into the workdir). The prompt is the
official `deepseek` chat format; a question without `<image_placeholder>` tags gets one per image in
front of it, a question with tags needs exactly one per image. Greedy decoding unless --temperature > 0
(then sampling with --top-p / --top-k and --seed); --top-p / --top-k without it are refused, not ignored.

Everything the user can get wrong (missing or unreadable image, placeholder/image count, a prompt
longer than the context, a folder without config or tokenizer, sampling flags that mean nothing) is
reported before the weights are loaded or anything compiles; a checkpoint whose weights turn out
unreadable (truncated safetensors, a missing shard or Orbax data file) is reported when they load. Each
is one line on stderr, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, TextIO

import jax

from dsvl_jax.convert.folders import describe
from dsvl_jax.convert.load import load_pretrained
from dsvl_jax.errors import CheckpointError, ConfigError, InputError
from dsvl_jax.generation.engine import Timings
from dsvl_jax.generation.inputs import pack_batch
from dsvl_jax.generation.sampling import check_sampling
from dsvl_jax.models.quant import WEIGHTS
from dsvl_jax.processing.chat import IMAGE_TAG
from dsvl_jax.processing.image import ImageError
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer import Tokenizer

EXIT_BAD_INPUT = 2
DEFAULT_MAX_NEW_TOKENS = 512
HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /reset        forget the conversation (and attached images)
  /help         this text
  /quit         leave (end of input works too)
anything else is your message; attached images go in front of it unless it has <image_placeholder> tags"""


class ChatError(ValueError):
    """Bad user input, reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsvl-chat", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question", nargs="?", help="the question; leave it out for an interactive session")
    ap.add_argument("--ckpt", required=True, help="checkpoint folder: HF-port or official layout (config.json, "
                    "safetensors, tokenizer) or an Orbax training workdir / checkpoints dir / step dir")
    ap.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help=f"answer length limit (default "
                    f"{DEFAULT_MAX_NEW_TOKENS}, or what the model context leaves after the prompt; a value you "
                    "give that does not fit is reduced with a note)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples; "
                    "negative values are refused")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set of "
                    "most probable tokens reaching this probability; needs --temperature > 0 (refused otherwise)")
    ap.add_argument("--top-k", type=int, default=None, help="sample among the k most probable tokens; needs "
                    "--temperature > 0 (refused otherwise)")
    ap.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling (default 0)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="compute/param dtype (default: the checkpoint's)")
    ap.add_argument("--weights", choices=WEIGHTS, default=None, help="fp32, bf16, or int8 (weight-only int8 LLM "
                    "linears with per-channel scales, quantized at load); default: the checkpoint's")
    ap.add_argument("--json", action="store_true", help="print token ids, answer and timings as JSON")
    return ap


def check_flags(args) -> None:
    """Flags that cannot work, or would be silently ignored, are refused (ChatError)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens={args.max_new_tokens}: must be at least 1")
    if not args.temperature >= 0:
        raise ChatError(f"--temperature={args.temperature}: must be ≥ 0 (0 = greedy decoding, > 0 samples)")
    if args.temperature == 0:
        given = [f for f, v in (("--top-p", args.top_p), ("--top-k", args.top_k)) if v is not None]
        if given:
            flags = " and ".join(given)
            raise ChatError(f"{flags} given but decoding is greedy (--temperature 0): add --temperature > 0 "
                            f"(e.g. 0.7) to sample, or leave {flags} out")
    try:
        check_sampling(args.temperature > 0, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise ChatError(str(e)) from None


class ChatSession:
    """Checkpoint + tokenizer + conversation history; the weights load on the first answer."""

    def __init__(self, args, out: TextIO, err: TextIO):
        self.args, self.out, self.err = args, out, err
        check_flags(args)
        folder = None
        try:
            folder = describe(args.ckpt)
            self.config = folder.config
            self.tokenizer = Tokenizer.from_file(folder.files_dir)
            self.processor = Processor(self.tokenizer, self.config)
        except FileNotFoundError as e:
            if folder is not None and folder.kind == "orbax":  # the trainer copies it there; a bare run may lack it
                raise ChatError(f"{e}; copy the training tokenizer (tokenizer.json and tokenizer_config.json) "
                                f"into {folder.files_dir}") from None
            raise ChatError(f"{args.ckpt}: {e}" if args.ckpt not in str(e) else str(e)) from None
        except (OSError, ConfigError, CheckpointError, ValueError) as e:
            raise ChatError(f"{args.ckpt}: {e}" if args.ckpt not in str(e) else str(e)) from None
        self.vlm = None
        self.history: list[dict] = []
        self.turn = 0

    @property
    def do_sample(self) -> bool:
        return self.args.temperature > 0

    # ---- checks (no weights needed) ----
    def check_image(self, path: str) -> None:
        try:
            self.processor.unit_image(path, name=path)
        except ImageError as e:
            raise ChatError(str(e)) from None

    def prepare(self, question: str, images: list) -> tuple[list, dict, int]:
        """The conversation with this turn added, the model batch, and max new tokens; raises ChatError."""
        question = question.strip()
        if not question:
            raise ChatError("empty question")
        tags = question.count(IMAGE_TAG)
        if tags == 0 and images:
            question = IMAGE_TAG * len(images) + question
        elif tags != len(images):
            raise ChatError(f"the question has {tags} {IMAGE_TAG} tag(s) but {len(images)} image(s) are attached")
        conversation = self.history + [{"role": "User", "content": question, "images": list(images)},
                                       {"role": "Assistant", "content": ""}]
        try:
            batch = self.processor(conversation)
        except ImageError as e:
            raise ChatError(str(e)) from None
        except ValueError as e:
            raise ChatError(str(e).replace("sample 0: ", "")) from None
        context = self.config.text.max_position_embeddings
        prompt_len = int(batch["attention_mask"].sum())
        asked = self.args.max_new_tokens
        max_new = min(DEFAULT_MAX_NEW_TOKENS if asked is None else asked, context - prompt_len)
        if max_new < 1:
            raise ChatError(f"the prompt has {prompt_len} tokens and fills the model context of {context} "
                            "positions; nothing left to answer with (try /reset or a shorter question)")
        if asked is not None and max_new < asked:  # the default shrinks silently: nobody asked for 512
            print(f"note: --max-new-tokens reduced to {max_new} to fit the context of {context} positions",
                  file=self.err)
        try:
            pack_batch(self.config, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                       batch.get("high_res_pixel_values"), max_new_tokens=max_new)
        except InputError as e:
            raise ChatError(str(e)) from None
        return conversation, batch, max_new

    # ---- answering ----
    def load(self) -> None:
        if self.vlm is None:
            try:
                self.vlm = load_pretrained(self.args.ckpt, dtype=self.args.dtype)
                if self.args.weights is not None:
                    self.vlm = self.vlm.with_weights(self.args.weights)
            except (OSError, ConfigError, CheckpointError) as e:  # truncated file, missing shard or data file
                raise ChatError(f"{self.args.ckpt}: {e}" if self.args.ckpt not in str(e) else str(e)) from None

    def answer(self, conversation: list, batch: dict, max_new: int) -> dict:
        """Generate (streaming the text unless --json), record the turn, return the JSON record."""
        self.load()
        a = self.args
        kw = dict(pixel_values=batch.get("pixel_values"), high_res_pixel_values=batch.get("high_res_pixel_values"),
                  attention_mask=batch["attention_mask"], max_new_tokens=max_new, do_sample=self.do_sample,
                  temperature=a.temperature if self.do_sample else 1.0, top_k=a.top_k, top_p=a.top_p,
                  rng=jax.random.fold_in(jax.random.key(a.seed), self.turn), eos_token_id=self.tokenizer.eos_id)
        gen = self.vlm.generator
        if a.json:
            result = gen.generate(batch["input_ids"], **kw)
            ids, timings = result.tokens[0].tolist(), result.timings
        else:
            timings, ids, printer = Timings(), [], _StreamPrinter(self.tokenizer, self.out)
            for step in gen.stream(batch["input_ids"], timings=timings, **kw):
                tok = int(step[0])
                ids.append(tok)
                if tok != self.tokenizer.eos_id:
                    printer.add(tok)
            printer.finish()
        answer_ids = ids[:ids.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in ids else ids
        text = self.tokenizer.decode(answer_ids).strip()
        if text:
            self.history = conversation[:-1] + [{"role": "Assistant", "content": text}]
        else:  # the chat format has no empty assistant turn in a history
            print("note: empty answer; this turn is not kept in the conversation", file=self.err)
        self.turn += 1
        record = {"answer": text, "token_ids": ids, "prompt_tokens": int(batch["attention_mask"].sum()),
                  "new_tokens": len(ids), "stopped_at_eos": self.tokenizer.eos_id in ids,
                  "timings": timings.as_dict()}
        if a.json:
            print(json.dumps(record), file=self.out, flush=True)
        return record

    def reset(self) -> None:
        self.history = []


class _StreamPrinter:
    """Prints the decoded answer as it grows: the text so far is decoded again at every token (a BPE
    token can be part of a character), and nothing is printed while it ends in an incomplete one."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids).lstrip()

    def add(self, tok: int) -> None:
        self.ids.append(tok)
        text = self._text()
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self) -> None:
        text = self._text()
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
        self.out.write("\n")
        self.out.flush()


def run_interactive(session: ChatSession, images: list, stdin: TextIO) -> int:
    err, interactive = session.err, stdin.isatty()
    pending = list(images)
    if interactive:
        print("dsvl-chat: type a message, /image PATH to attach an image, /help for commands.", file=err)
    while True:
        if interactive:
            err.write("User: ")
            err.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            rest = rest.strip()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                print(HELP, file=err)
            elif cmd == "/reset":
                session.reset()
                pending = []
                print("(conversation cleared)", file=err)
            elif cmd == "/image":
                if not rest:
                    print("error: /image needs a path", file=err)
                    continue
                try:
                    session.check_image(rest)
                except ChatError as e:
                    print(f"error: {e}", file=err)
                    continue
                pending.append(rest)
                print(f"(image {len(pending)} attached: {rest})", file=err)
            else:
                print(f"error: unknown command {cmd!r} (/help lists them)", file=err)
            continue
        try:
            conversation, batch, max_new = session.prepare(line, pending)
        except ChatError as e:
            print(f"error: {e}", file=err)
            continue
        if interactive:
            err.write("Assistant: ")
            err.flush()
        session.answer(conversation, batch, max_new)
        pending = []


def main(argv: Optional[list] = None, stdin: TextIO = None, out: TextIO = None, err: TextIO = None) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isdir(args.ckpt):
            raise ChatError(f"--ckpt {args.ckpt!r}: no such directory")
        session = ChatSession(args, out, err)
        for path in args.image:
            session.check_image(path)
        if args.question is None:
            return run_interactive(session, args.image, stdin)
        conversation, batch, max_new = session.prepare(args.question, args.image)
        session.answer(conversation, batch, max_new)
        return 0
    except ChatError as e:
        print(f"dsvl-chat: error: {e}", file=err)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
