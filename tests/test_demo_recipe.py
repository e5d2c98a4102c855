"""The demo recipe's pieces: the endless train stream and task-tag prompting.

- `SuiteStream` item i is train example i of the suite (the order of `tasks.split_keys`), the same bytes every
  time, and it feeds the real loader as a `generator` source.
- Task-tag prompting: what the trainer sees for a tagged request begins with exactly the tokens the
  inference prompt (`evaluate.prompt(..., task_tag=True)`) gives the model, so training and scoring agree.
"""
import numpy as np
import pytest

from dsvl_jax import tasks
from dsvl_jax.data import loader
from dsvl_jax.data import records as R
from dsvl_jax.data.mixture import SourceConfig
from dsvl_jax.data.transforms import ExampleMaker
from dsvl_jax.demo import data, evaluate, recipe
from dsvl_jax.demo.stream import SuiteStream
from dsvl_jax.processing.processor import Processor
from dsvl_jax.processing.tokenizer_build import build_bpe_tokenizer

FAMILIES = ("scene", "chart")
SIZE = recipe.ModelSize(image_size=64, sam_width=32, sam_layers=2, siglip_width=32, siglip_layers=1, lm_width=64,
                        lm_layers=1, lm_heads=2, context=256)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    examples = tasks.make_split("train", 24, FAMILIES, 64)
    texts = [f"{data.SYSTEM_PROMPT}\n\nUser: [scene] [chart] {e.question}\n\nAssistant: {e.answer}" for e in examples]
    return build_bpe_tokenizer(texts * 4, 400, str(tmp_path_factory.mktemp("tok")))


def test_stream_item_is_the_split_example_and_stable():
    stream = SuiteStream("qa", FAMILIES, 64, length=100)
    keys = tasks.split_keys("train", 6, FAMILIES)
    for i, (family, seed, index) in enumerate(keys):
        rec = R.deserialize(stream[i])
        example = tasks.generate(family, seed, index, 64)
        assert rec.record_id == example.id and rec.task == family
        assert rec.segments[-1].text == example.answer
        assert stream[i] == SuiteStream("qa", FAMILIES, 64, length=100)[i]  # another instance, same bytes
    assert len(stream) == 100
    assert R.deserialize(SuiteStream("qa", FAMILIES, 64, offset=6)[0]).record_id == \
        tasks.generate(*keys[0][:2], 3, 64).id  # the offset skips whole round-robin turns


def test_stream_rejects_unknown_kind_and_family():
    with pytest.raises(ValueError, match="kind='answers'"):
        SuiteStream("answers", FAMILIES, 64)
    with pytest.raises(ValueError, match="'menu'"):
        SuiteStream("qa", ("menu",), 64)


def test_stream_feeds_the_loader(tok):
    model = recipe.demo_model(tok.vocab_size, tok.image_token_id, 1, SIZE)
    src = SourceConfig("qa", generator="dsvl_jax.demo.stream:SuiteStream",
                       generator_args=dict(kind="qa", families=FAMILIES, image_size=64))
    cfg = loader.DataConfig(sources=(src,), pack=True, max_images_per_row=2, tasks=loader.DEFAULT_TASKS + FAMILIES)
    batch = next(loader.make_train_iterator(cfg, model, tok, batch_size=2, seq_len=128, seed=0))
    assert batch["image_mask"].sum() >= 2 and batch["loss_mask"].sum() > 0
    with pytest.raises(ValueError, match="'qa'.*cannot load generator"):
        loader.open_source(SourceConfig("qa", generator="dsvl_jax.demo.stream:NoSuchSource"))
    with pytest.raises(ValueError, match="'qa'.*must live in the dsvl_jax package"):
        loader.open_source(SourceConfig("qa", generator="os:system"))


@pytest.mark.parametrize("tags", [False, True])
def test_task_tag_prompt_matches_training_tokens(tok, tags):
    model = recipe.demo_model(tok.vocab_size, tok.image_token_id, 1, SIZE)
    example = tasks.generate("chart", 0, 3, 64)
    maker = ExampleMaker(tok, model, tasks=loader.DEFAULT_TASKS + FAMILIES, task_tag_prompt=tags)
    trained = maker.make(R.deserialize(R.serialize(data.qa_record(example, example.png_bytes()))))["ids"]
    batch = Processor(tok, model, system_prompt=data.SYSTEM_PROMPT)([evaluate.prompt(example, task_tag=tags)])
    prompt_ids = batch["input_ids"][0][batch["attention_mask"][0].astype(bool)]
    np.testing.assert_array_equal(trained[:len(prompt_ids)], prompt_ids)
    assert ("[chart] " in tok.decode(prompt_ids.tolist())) == tags
