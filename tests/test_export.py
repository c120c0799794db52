"""torch.export of the stage-1 model: the checks that read tensor values (bad-input refusals, the padding skip) stay
out of a traced graph (`compat.is_traced`), so the graph holds no data-dependent branch."""

import torch

from tests.tiny_models import tiny_batch, tiny_model


class Stage1Losses(torch.nn.Module):
    """The forward as a function of tensors only, what torch.export takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask):
        output = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        return output.loss_itc, output.loss_itm, output.loss_itg, output.logits_per_image


def test_stage1_forward_exports_and_the_exported_program_gives_the_eager_outputs():
    model = tiny_model().eval()  # eval: the ITM negatives come from a seeded generator, the same in both runs
    pixel_values, input_ids, attention_mask = tiny_batch()
    assert (attention_mask == 0).any()  # padded captions: eager skips padding where the graph computes it
    wrapper = Stage1Losses(model)
    exported = torch.export.export(wrapper, (pixel_values, input_ids, attention_mask))
    with torch.no_grad():
        traced = exported.module()(pixel_values, input_ids, attention_mask)
        eager = wrapper(pixel_values, input_ids, attention_mask)
    for traced_value, eager_value in zip(traced, eager):
        torch.testing.assert_close(traced_value, eager_value, atol=1e-5, rtol=1e-5)
