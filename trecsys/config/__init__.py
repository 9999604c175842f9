"""The experiment config: one schema of dataclasses whose field names are the YAML keys.

A config file may `inherit:` a base file (a path relative to itself); command-line overrides are
dotted `key.sub=value` pairs whose values are parsed as YAML scalars/lists. Every key is checked
against the schema: unknown keys (with the closest known key suggested), wrong types and missing
required values are ConfigErrors naming the dotted key. The resolved config is what a stage sees,
prints with `--print-config` and saves beside its artifacts — there is no hidden default layer.

`schema.py` holds the sections, `load.py` reads YAML and overrides into them; both are re-exported
here, so `from trecsys.config import ExperimentConfig, load_config` is the one import to use.
"""

from trecsys.config.load import (  # noqa: F401
    _UniqueKeyLoader,
    all_keys,
    apply_overrides,
    build,
    data_path,
    deep_merge,
    load_config,
    parse_override,
    read_yaml,
    to_dict,
    to_yaml,
)
from trecsys.config.schema import (  # noqa: F401
    CANDIDATE_NAMES,
    STRATEGY_NAMES,
    ColumnConfig,
    DataConfig,
    DistillConfig,
    DomainConfig,
    EmbeddingConfig,
    EvaluateConfig,
    ExperimentConfig,
    FinetuneConfig,
    FusionComponent,
    ModelConfig,
    PretrainConfig,
    RecommendConfig,
    RuntimeConfig,
    SearchConfig,
    SyntheticConfig,
    TrackConfig,
    TrainConfig,
)
