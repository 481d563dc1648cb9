"""The models: the frozen pretrained backbones (``backbones``), the top layers ``--finetune`` trains (``tops``) and
the trainable projection heads with their momentum copies (``heads``)."""

from fne_fast.models.backbones import (IMAGE_DEPTH, TEXT_DEPTH, ImageEncoder, LazyEncoders,  # noqa: F401
                                       MissingEncoderError, TextEncoder, backbone_depth, image_encoder_version,
                                       shared_image_encoder, shared_text_encoder, text_encoder_version,
                                       text_trunk, trunk_version)
from fne_fast.models.heads import MatchingHeads, ProjectionHead, Tower, momentum_copy  # noqa: F401
from fne_fast.models.tops import TOP_PRECISIONS, ImageTop, TextTop, backbone_tops, image_side_modality  # noqa: F401

__all__ = ["ImageEncoder", "TextEncoder", "LazyEncoders", "MissingEncoderError", "image_encoder_version",
           "text_encoder_version", "shared_text_encoder", "shared_image_encoder", "backbone_depth", "trunk_version",
           "text_trunk", "IMAGE_DEPTH", "TEXT_DEPTH", "ProjectionHead", "Tower", "MatchingHeads", "momentum_copy",
           "TextTop", "ImageTop", "backbone_tops", "image_side_modality", "TOP_PRECISIONS"]
