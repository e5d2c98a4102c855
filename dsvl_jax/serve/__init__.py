"""Serving (`dsvl-serve`): an OpenAI-compatible chat completions API over HTTP with dynamic batching.

- `rows`: one request → a prepared row; rows → one padded `VLM.generate` batch (also used by `dsvl-eval`);
- `model`: checkpoint folder → (VLM, Processor), on a mesh when there are several devices;
- `protocol`: the OpenAI request schema checked and turned into a conversation; response and error bodies;
- `text`: generated ids → text as it grows, with stop strings;
- `batcher`: the worker thread that decodes requests arriving together in one batch;
- `app`: the Starlette application; `cli`: the command.

Nothing is imported here, so `dsvl-eval` does not need the web stack.
"""
