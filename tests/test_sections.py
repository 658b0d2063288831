"""The shared config sections: a task changes only what differs, and a misspelled field in a
config file stops it, naming the field."""

import pytest

from floranna_jax import config_check, sections
from tests.smoke_setup import REPO


def test_a_change_replaces_the_default_and_keeps_the_order():
    default, changed = sections.client(), sections.client(micro_batch_size=16)
    assert default.micro_batch_size == 0 and changed.micro_batch_size == 16
    assert list(changed) == list(default)


def test_an_unknown_field_names_itself_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"config section train: unknown fields \['chunk'\];"):
        sections.train(chunk=4)


def test_task_fields_follow_the_shared_eval_fields():
    section = sections.evaluation(dict(max_new_tokens=8), batch_size=4)
    assert list(section)[-1] == "max_new_tokens" and section.batch_size == 4
    assert list(section)[:-1] == list(sections.evaluation())


@pytest.mark.parametrize("name", ["glue.py", "gsm8k.py", "code.py"])
def test_every_smoke_config_is_the_shared_smoke_run(name):
    config = config_check.load_file(REPO / "configs" / name, "smoke")
    assert config.model.source == "random" and config.data.source == "synthetic"
    assert (config.train.num_rounds, config.train.clients_per_round) == (2, 3)
    assert (config.partition.num_clients, config.eval.every_rounds) == (4, 1)
    config_check.validate(config)
