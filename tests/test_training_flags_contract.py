"""One vocabulary for the encoder spec: training's --vggt_* flags and `featstore build`'s flags take
their choices and defaults from featstore's contract (EncoderSpec / PreprocessSpec fields, the
dtype names, the recipes, the store name), so that the two command lines cannot drift apart.

Both real parsers are built; each pair of flags for one spec field must offer exactly the
contract's choices, and training's defaults (and the defaults their help texts name) must be the
contract's."""

from __future__ import annotations

import argparse

import pytest

from featstore.build.cli import configure_parser
from featstore.build.options import BuildOptions
from featstore.build.recipes import RECIPE_NAMES
from featstore.contract.dtypes import DTYPE_NAMES, STORAGE_DTYPE_NAMES
from featstore.contract.naming import DEFAULT_STORE_NAME
from featstore.contract.spec import EncoderSpec, PreprocessSpec, field_choices, field_default

# training flag -> (featstore build flag, the contract's choices, the contract's default or None
# where training derives it from other flags)
SPEC_FLAGS = {
    "--vggt_attention": ("--attention", field_choices(EncoderSpec, "attention"), None),
    "--vggt_frames_kept": ("--frames-kept", field_choices(EncoderSpec, "frames_kept"), None),
    "--vggt_reference_frame": ("--reference-frame", field_choices(EncoderSpec, "reference_frame"),
                               field_default(EncoderSpec, "reference_frame")),
    "--vggt_preprocess_mode": ("--preprocess-mode", field_choices(PreprocessSpec, "mode"),
                               field_default(PreprocessSpec, "mode")),
    "--vggt_storage_dtype": ("--storage-dtype", STORAGE_DTYPE_NAMES, field_default(EncoderSpec, "storage_dtype")),
    "--vggt_compute_dtype": ("--compute-dtype", DTYPE_NAMES, field_default(EncoderSpec, "compute_dtype")),
    "--vggt_layer": ("--layer", None, field_default(EncoderSpec, "layer")),
    "--recipe": ("--recipe", RECIPE_NAMES, None),
}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


@pytest.fixture(scope="module")
def training_flags():
    from training.args import build_parser

    return _actions(build_parser())


@pytest.fixture(scope="module")
def build_flags():
    p = argparse.ArgumentParser()
    configure_parser(p)
    return _actions(p)


@pytest.mark.parametrize("flag", sorted(SPEC_FLAGS))
def test_training_and_build_offer_the_contracts_choices(flag, training_flags, build_flags):
    build_flag, choices, _ = SPEC_FLAGS[flag]
    if choices is None:
        assert training_flags[flag].choices is None and build_flags[build_flag].choices is None
        return
    assert tuple(training_flags[flag].choices) == tuple(choices), f"{flag} restates other choices than the contract"
    assert tuple(build_flags[build_flag].choices) == tuple(choices), f"{build_flag} restates other choices"


@pytest.mark.parametrize("flag", sorted(f for f, (_, _, default) in SPEC_FLAGS.items() if default is not None))
def test_training_defaults_and_their_help_are_the_contracts(flag, training_flags, build_flags):
    build_flag, _, default = SPEC_FLAGS[flag]
    assert training_flags[flag].default == default
    assert f"default {default}" in training_flags[flag].help
    # build leaves the spec flags unset (the encoder preset's values apply) and names the default
    assert build_flags[build_flag].default is None
    assert f"default {default}" in build_flags[build_flag].help


def test_the_store_name_and_the_default_encoder_are_featstores(training_flags, build_flags):
    import training.args

    assert training.args.DEFAULT_STORE_NAME == DEFAULT_STORE_NAME
    assert f"<data_root>/{DEFAULT_STORE_NAME}" in training_flags["--vggt_cache_path"].help
    assert build_flags["--encoder"].default == field_default(BuildOptions, "encoder")
    assert f"else {field_default(BuildOptions, 'encoder')})" in training_flags["--vggt_encoder"].help
