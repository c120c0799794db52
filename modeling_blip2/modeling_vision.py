"""The image side both stages share: any vision tower AutoModel builds, and the queries that read it."""

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import ModelOutput

from .configuration import Blip2BridgeConfig
from .compat import select_hidden_states
from .hub import explain_missing_folder
from .modeling_qformer import Blip2BridgePreTrainedModel, Blip2BridgeQFormerOutput, QFormerRows
from .transformers_formats import converted_config

# What `from_pretrained` passes on to read a folder's config.json from the Hub as the model's weights will be.
HUB_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


@dataclass
class Blip2BridgeImageFeaturesOutput(BaseModelOutputWithPooling):
    """What `get_image_features` returns, in the layout transformers' `get_image_features` use.

    last_hidden_state: (batch, image_length, vision_width) the features the queries read (the tower's hidden state at
        `vision_feature_layer`, after `vision_layernorm`).
    pooler_output: (batch, num_query_tokens, width) the model's image features: stage 1 the L2-normalised ITC
        embeddings (`vision_proj`, width embed_dim), stage 2 the queries in the LLM's embedding space
        (`language_projection`), what `image_features=` takes.
    hidden_states, attentions: the vision tower's, with output_hidden_states / output_attentions (from pixels only).
    query_output: (batch, num_query_tokens, qformer_hidden_size) the Q-Former's query outputs.
    qformer_outputs: the query pass's Q-Former output, with its own hidden states and attentions when asked.
    """

    query_output: torch.FloatTensor | None = None
    qformer_outputs: Blip2BridgeQFormerOutput | None = None


def vision_model_class(vision_config) -> type[PreTrainedModel]:
    """Any vision tower AutoModel builds; BLIP-2's own (the EVA ViT-g layout) is not in AutoModel's table."""
    return Blip2VisionModel if isinstance(vision_config, Blip2VisionConfig) else MODEL_MAPPING[type(vision_config)]


def build_vision_model(vision_config) -> PreTrainedModel:
    return vision_model_class(vision_config)._from_config(vision_config)


class Blip2BridgeImageQueryModel(Blip2BridgePreTrainedModel):
    """The base of both stages: a frozen image encoder, its LayerNorm, and the learned queries' pass over the image.

    Subclasses build `query_tokens` and `qformer`; this class builds the vision side (`_build_vision`), keeps the
    frozen encoder frozen across `from_pretrained` and `train()`, and runs the query pass (`get_query_output`).
    """

    def _build_vision(self, config: Blip2BridgeConfig):
        self.vision_model = build_vision_model(config.vision_config)
        self.vision_layernorm = nn.LayerNorm(config.vision_config.hidden_size, eps=config.vision_layer_norm_eps)
        self._freeze_frozen_modules()

    stage: int  # 1 or 2: which of transformers' BLIP-2 family formats `from_pretrained` converts

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Also loads the transformers BLIP-2 family formats of this stage (`transformers_formats.converted_config`),
        renaming their weights on the way."""
        converted = None
        if config is None and pretrained_model_name_or_path is not None:
            hub_kwargs = {name: kwargs[name] for name in HUB_DOWNLOAD_KWARGS if name in kwargs}
            with explain_missing_folder(pretrained_model_name_or_path):
                config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            converted = converted_config(config_dict, cls.stage, pretrained_model_name_or_path)
            if converted is not None:
                config, key_mapping = converted
                kwargs["key_mapping"] = {**key_mapping, **(kwargs.get("key_mapping") or {})}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if "key_mapping" in kwargs:
            # transformers would save the weights back under the names they were loaded from; ours are the names now.
            model._weight_conversions = None
        # Loading makes fresh parameters, all trainable: freeze again what the config keeps frozen.
        model._freeze_frozen_modules()
        if converted is not None:
            model.report_conversion(pretrained_model_name_or_path)
        return loaded

    def report_conversion(self, source) -> None:
        """Says what a converted folder lacked (nothing by default)."""

    def _freeze_frozen_modules(self):
        if self.config.freeze_vision_model:
            self.vision_model.requires_grad_(False)

    @property
    def vision_model_is_frozen(self) -> bool:
        """No parameter of the tower trains: what `config.freeze_vision_model` sets at build and load time, and what
        `vision_model.requires_grad_(True)` undoes (the tower then trains, in train mode, with gradients)."""
        return not any(parameter.requires_grad for parameter in self.vision_model.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_model_is_frozen:
            # A frozen encoder stays in eval mode: no dropout, no drop-path, fixed normalisation statistics.
            self.vision_model.eval()
        return self

    def get_image_embeds(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, image_length, vision_width): the vision features after `vision_layernorm`, from pixels or from the
        tower's cached `vision_features` (see `image_embeds_from_vision_features`).

        interpolate_pos_encoding: let a tower with a fixed position table (BLIP-2's, CLIP, SigLIP, ViT) read images of
        another size than `vision_config.image_size`; pass the result to the model as `image_embeds`.
        """
        if (pixel_values is None) == (vision_features is None):
            raise ValueError("pass exactly one of pixel_values and vision_features")
        if vision_features is not None:
            return self.image_embeds_from_vision_features(vision_features)
        return self.run_vision_model(pixel_values, interpolate_pos_encoding)[0]

    def image_embeds_from_vision_features(
        self, vision_features: torch.Tensor | None, **other_inputs: torch.Tensor | None
    ) -> torch.Tensor | None:
        """`image_embeds` of `vision_features`, the frozen tower's output at `vision_feature_layer` before
        `vision_layernorm` (what `blip2-bridge cache-features` stores): only the LayerNorm runs, so it still trains.

        The one place every entry point (forward, generate, get_image_features, get_itm_logits) resolves
        `vision_features`; other_inputs: the other image inputs of the call by name (pixel_values, image_embeds,
        image_features), refused beside vision_features. Returns `other_inputs["image_embeds"]` when vision_features
        is None, so that a caller reads `image_embeds = self.image_embeds_from_vision_features(...)` either way.
        """
        if vision_features is None:
            return other_inputs.get("image_embeds")
        given = [name for name, value in other_inputs.items() if value is not None]
        if given:
            raise ValueError(
                f"pass exactly one of {', '.join(other_inputs)} and vision_features; got vision_features and "
                f"{' and '.join(given)}"
            )
        width = self.config.vision_config.hidden_size
        if vision_features.dim() not in (3, 4) or vision_features.shape[-1] != width or 0 in vision_features.shape:
            raise ValueError(
                f"vision_features has shape {tuple(vision_features.shape)}; expected (batch, image_length, {width}): "
                "the vision tower's hidden state at vision_feature_layer, before vision_layernorm"
            )
        if self.training and not self.vision_model_is_frozen:
            raise ValueError(
                "vision_features given while the vision tower trains (its parameters require grad): cached features "
                "are those of the tower's weights when they were cached; pass pixel_values, or freeze the tower"
            )
        return self.apply_vision_layernorm(vision_features)

    def apply_vision_layernorm(self, vision_features: torch.Tensor) -> torch.Tensor:
        """The tower's features at `vision_feature_layer` -> `image_embeds`, in the LayerNorm's precision."""
        return self.vision_layernorm(vision_features.to(self.vision_layernorm.weight.dtype))

    def run_vision_model(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | list[int] = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ModelOutput]:
        """`get_image_embeds` with the tower's own output beside it (its hidden states and attentions when asked)."""
        features, outputs = self.run_vision_tower(
            pixel_values, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        return self.apply_vision_layernorm(features), outputs

    def run_vision_tower(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | list[int] = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ModelOutput]:
        """The tower alone: its hidden state at `vision_feature_layer` (before `vision_layernorm`) and its output."""
        expected_channels = getattr(self.config.vision_config, "num_channels", 3)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != expected_channels:
            channels = pixel_values.shape[1] if pixel_values.dim() == 4 else "?"
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} ({channels} channels); expected "
                f"(batch, {expected_channels}, height, width)"
                + (" (RGB)" if expected_channels == 3 else "")
            )
        if pixel_values.shape[0] == 0 or pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected at least one non-empty image")
        tower_options = {}
        if self._vision_takes_interpolate_pos_encoding:
            if interpolate_pos_encoding:
                tower_options["interpolate_pos_encoding"] = True
            else:
                self._check_image_size(pixel_values)
        feature_layer = self.config.vision_feature_layer
        pixel_values = pixel_values.to(self.vision_model.dtype)
        # The tower's mode follows the model's, except that a frozen tower always evaluates; decided here as well as in
        # train(), because a tower can be unfrozen (requires_grad_) after train() was called.
        self.vision_model.train(self.training and not self.vision_model_is_frozen)
        if output_attentions:
            tower_options["output_attentions"] = True
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_model_is_frozen):
            outputs = self.vision_model(
                pixel_values=pixel_values,
                output_hidden_states=bool(output_hidden_states) or feature_layer is not None,
                return_dict=True,
                **tower_options,
            )
        features = outputs.last_hidden_state if feature_layer is None else outputs.hidden_states[feature_layer]
        # Asked for by the feature layer only, or some of them only. Not set to None: a ModelOutput keeps a field set to
        # None in its mapping, where accelerate's mixed precision copies every tensor to float32 (a ViT-g's 40 hidden
        # states at batch 256: 15 GB) and the model's output would hold them all until it is dropped.
        hidden_states = select_hidden_states(outputs.hidden_states if output_hidden_states else None,
                                             output_hidden_states)
        fields = {name: value for name, value in outputs.items() if name != "hidden_states"}
        outputs = type(outputs)(**fields, **({} if hidden_states is None else {"hidden_states": hidden_states}))
        return features, outputs

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, image_length, vision_width): the frozen tower's hidden state at `vision_feature_layer`, before
        `vision_layernorm`: what `blip2-bridge cache-features` stores and `vision_features` takes."""
        with torch.no_grad():
            return self.run_vision_tower(pixel_values)[0]

    def project_query_output(self, query_output: torch.Tensor) -> torch.Tensor:
        """The image features each stage makes of the query outputs (stage 1: ITC embeddings; stage 2: LLM inputs)."""
        raise NotImplementedError

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> "Blip2BridgeImageFeaturesOutput | tuple":
        """The image through the tower and the query pass, as transformers' `get_image_features` returns it:
        `pooler_output` holds this model's image features (`project_query_output`), `last_hidden_state` the features
        the queries read; see `Blip2BridgeImageFeaturesOutput`.

        output_attentions, output_hidden_states, return_dict: default to the config's, as in transformers.
        qformer_input_ids, qformer_attention_mask: an instruction the queries read (InstructBLIP); see
            `get_query_output`.
        vision_features: the tower's cached output instead of pixels (`image_embeds_from_vision_features`).
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        tower_output = None
        image_embeds = self.image_embeds_from_vision_features(
            vision_features, pixel_values=pixel_values, image_embeds=image_embeds
        )
        if pixel_values is not None and image_embeds is None:
            image_embeds, tower_output = self.run_vision_model(
                pixel_values, interpolate_pos_encoding, output_hidden_states, output_attentions
            )
        else:
            image_embeds = self._resolve_image_embeds(pixel_values, image_embeds)  # refuses both or neither
        query_pass = self.get_query_output(
            image_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
        )
        query_output = query_pass.last_hidden_state[:, : self.config.num_query_tokens]
        output = Blip2BridgeImageFeaturesOutput(
            last_hidden_state=image_embeds,
            pooler_output=self.project_query_output(query_output),
            hidden_states=None if tower_output is None else tower_output.hidden_states,
            attentions=None if tower_output is None else tower_output.attentions,
            query_output=query_output,
            qformer_outputs=query_pass,
        )
        return output if return_dict else output.to_tuple()

    @property
    def _vision_takes_interpolate_pos_encoding(self) -> bool:
        """Towers with this option have a position table for `image_size` only (Dinov2 always interpolates)."""
        return "interpolate_pos_encoding" in inspect.signature(self.vision_model.forward).parameters

    def _check_image_size(self, pixel_values: torch.Tensor):
        image_size = getattr(self.config.vision_config, "image_size", None)
        if image_size is None:
            return
        expected = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
        if tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"pixel_values are {pixel_values.shape[-2]}x{pixel_values.shape[-1]} pixels (height x width); the "
                f"vision tower expects {expected[0]}x{expected[1]} (vision_config.image_size). Resize the images to "
                f"that size (the processor saved with the model does: AutoProcessor.from_pretrained(model folder)), "
                "or compute image_embeds = model.get_image_embeds(pixel_values, interpolate_pos_encoding=True) and "
                "pass image_embeds instead of pixel_values"
            )

    def _resolve_image_embeds(
        self,
        pixel_values: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        interpolate_pos_encoding: bool = False,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_embeds = self.image_embeds_from_vision_features(
            vision_features, pixel_values=pixel_values, image_embeds=image_embeds
        )
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("pass exactly one of pixel_values and image_embeds")
        if pixel_values is not None:
            return self.get_image_embeds(pixel_values, interpolate_pos_encoding)
        width = self.config.qformer_config.encoder_hidden_size
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != width or 0 in image_embeds.shape:
            raise ValueError(
                f"image_embeds has shape {tuple(image_embeds.shape)}; expected (batch, image_length, {width}) with at "
                "least one image of at least one token"
            )
        return image_embeds

    def get_query_output(
        self,
        image_embeds: torch.Tensor,
        use_cache: bool = False,
        image_key_values: list | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ):
        """Runs the learned queries over the images; returns the Q-Former output (with the queries' cache if asked).

        image_key_values: `qformer.project_image(image_embeds)`, when the caller already has it.
        qformer_input_ids, qformer_attention_mask: (batch, length) Q-Former tokens of an instruction, one per image
            (InstructBLIP, a Q-Former built with `use_text_input=True`): the queries and the instruction share
            self-attention (bidirectional), only the queries cross-attend to the image. The output then holds the
            queries' positions only (unless hidden states or attentions are asked for, which cover every position).
        """
        if qformer_input_ids is None:
            # One set of learned queries serves every image: computed once until they meet the images.
            return self.qformer(
                query_embeds=self.query_tokens,
                image_embeds=image_embeds,
                image_key_values=image_key_values,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        if not self.config.qformer_config.use_text_input:
            raise ValueError(
                "qformer_input_ids given, but this model's Q-Former reads no text (qformer_config.use_text_input="
                "False): only an instruction-aware (InstructBLIP) model takes an instruction for its queries"
            )
        num_images = image_embeds.shape[0] if image_key_values is None else image_key_values[0].shape[1]
        if qformer_input_ids.dim() != 2 or qformer_input_ids.shape[0] != num_images:
            raise ValueError(
                f"qformer_input_ids has shape {tuple(qformer_input_ids.shape)}; expected ({num_images}, length): one "
                "instruction per image"
            )
        return self.qformer(
            input_ids=qformer_input_ids,
            attention_mask=qformer_attention_mask,
            query_embeds=self.query_tokens,
            image_embeds=image_embeds,
            image_key_values=image_key_values,
            use_cache=use_cache,
            rows=QFormerRows(output_rows=self.config.num_query_tokens),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
