"""README "Use it from Python": budgets are set on the processor (they decide how many
placeholders the prompt holds); `generate`/`forward` take them from its output, accept the
same budgets again, and refuse others with a message that says where to put them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from uhrbat.errors import BudgetError

KW = dict(max_new_tokens=3, min_new_tokens=3, kmeans_clusters=6, kmeans_iters=3)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from uhrbat.modeling.loading import load

    return load(tiny_checkpoint)


def test_generate_takes_the_processors_budgets(loaded) -> None:
    model, proc = loaded
    img = Image.new("RGB", (300, 200), (30, 120, 40))
    inputs = proc(images=img, text=proc.build_prompt("How many trees?"), budgets=[4, 8])
    implied = model.generate(**inputs, **KW)  # budgets from the processor's output
    repeated = model.generate(**inputs, budgets=[4, 8], **KW)  # given twice: no TypeError, the same
    assert torch.equal(implied, repeated)
    with pytest.raises(BudgetError) as e:
        model.generate(**inputs, budgets=[8, 16], **KW)
    assert "12 image placeholders but budgets [8, 16] give 24 visual tokens" in str(e.value)
    assert "pass budgets to the processor" in str(e.value)
    default = proc(images=img, text=proc.build_prompt("How many trees?"))  # the processor's own budgets
    assert int((default["input_ids"] == proc.image_token_id).sum()) == sum(proc.budgets)
    model.generate(**default, **KW)
