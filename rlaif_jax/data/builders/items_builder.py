"""tfds builder of checked items (text and the id of their video), one config per kind."""
from __future__ import annotations

import tensorflow_datasets as tfds

from rlaif_jax.data.builders import items_json


class Items(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Items in their JSON order (record index = position among the split's kept items)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=kind) for kind in items_json.KINDS]

    def __init__(self, *, splits: dict | None = None, use_beam: bool = False, **kwargs):
        self._splits = splits or {}
        self._use_beam = use_beam
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=items_json.features(self.builder_config.name),
            description=f"{self.builder_config.name} items of the reference JSON format.",
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(examples) for name, examples in self._splits.items()}

    def _generate_examples(self, examples: list):
        if self._use_beam:
            beam = tfds.core.lazy_imports.apache_beam
            return beam.Create(list(enumerate(examples)))
        return enumerate(examples)
