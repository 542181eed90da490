"""The benchmarks vigorl evaluates: for each, the task family, default mode and sampling, the data file of the
original release and the published numbers; and how a sample finds its benchmark and category.

    from vigorl_core.evals.benchmarks import BENCHMARKS, benchmark_of, get_benchmark
    spec = get_benchmark("vstar")          # Benchmark(task="visual_search", mode="multiturn", ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vigorl_core.records import Sample
from vigorl_core.rewards import judge_for
from vigorl_core.sample_fields import path_category


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is evaluated. `data` is its file under the original release's DATA_ROOT
    (paths as in docs/method.md "Data of the original release"; None: not in the release). `paper` holds
    published (mean %, 95% half-width or None); the V* intervals in the paper are one standard error, not 95%."""

    task: str
    mode: str
    source: str
    data: str | None = None
    temperature: float = 0.5
    top_p: float = 1.0
    paper: dict[str, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def judges(self) -> tuple[str, str]:
        return judge_for(self.task)


# Sampling of the original eval scripts: one sample at T=0.5, top_p 1.0; multi-turn top_p 0.99.
BENCHMARKS: dict[str, Benchmark] = {
    "sat2": Benchmark("spatial", "grounded", "sat2", "spatial_reasoning/sat2_test/sat2_test.jsonl",
                      paper={"Qwen2.5-VL-7B": (52.6, 1.6), "ViGoRL-3B": (62.9, 1.5), "ViGoRL-7B": (67.5, 1.5)}),
    "blink": Benchmark("spatial", "grounded", "blink", "spatial_reasoning/blink/blink_validation.jsonl",
                       paper={"Qwen2.5-VL-7B": (52.9, 2.3), "ViGoRL-3B": (48.5, 2.3), "ViGoRL-7B": (54.1, 2.3)}),
    "robospatial": Benchmark("spatial", "grounded", "robospatial", None,
                             paper={"Qwen2.5-VL-7B": (46.7, 9.5), "ViGoRL-3B": (67.1, 6.1), "ViGoRL-7B": (76.4, 7.5)}),
    "vstar": Benchmark("visual_search", "multiturn", "vstar", "visual_search/vstar/vstarbench_test.jsonl", top_p=0.99,
                       paper={"Qwen2.5-VL-7B": (78.0, 3.0), "ViGoRL-3B multi-turn": (81.2, 2.8),
                              "ViGoRL-7B multi-turn": (86.4, 2.7)}),
    "screenspot_v2": Benchmark("grounding", "grounded", "screenspot_v2",
                               "web_grounding/ScreenSpot-V2/screenspot_v2_test.jsonl",
                               paper={"Qwen2.5-VL-7B": (73.6, 2.4), "ViGoRL-3B": (86.5, 1.9),
                                      "ViGoRL-7B": (91.0, 1.6)}),
    "screenspot_pro": Benchmark("grounding", "grounded", "screenspot_pro",
                                "web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl",
                                paper={"Qwen2.5-VL-7B": (29.0, None), "ViGoRL-3B": (31.1, 2.3),
                                       "ViGoRL-7B": (33.1, 2.3)}),
    "osatlas": Benchmark("grounding", "grounded", "osatlas", "web_grounding/vigorl_osatlas_val_RL.jsonl"),
    "vwa": Benchmark("web_action", "grounded", "vwa", None,
                     paper={"Qwen2.5-VL-7B": (5.5, 1.5), "ViGoRL-3B": (6.4, 1.5), "ViGoRL-7B": (11.2, 2.1)}),
    "synthetic_visual_search": Benchmark("visual_search", "multiturn", "synthetic"),
    "synthetic_grounding": Benchmark("grounding", "grounded", "synthetic"),
    "synthetic_spatial": Benchmark("spatial", "grounded", "synthetic"),
    # The quickstart's tasks (vigorl_core.synthetic.tasks.QUICKSTART_TASKS): colour questions, their own sources.
    "synthetic_colour": Benchmark("visual_search", "grounded", "synthetic_colour"),
    "synthetic_zoom_colour": Benchmark("visual_search", "multiturn", "synthetic_zoom_colour"),
}


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}") from None


def benchmark_of(sample: Sample) -> str:
    """Benchmark name of a sample: its source, or synthetic_<task> for our synthetic tasks."""
    name = f"synthetic_{sample.task}" if sample.source == "synthetic" else sample.source
    get_benchmark(name)
    return name


CATEGORY_KEYS = ("category", "question_type", "type", "data_type", "ui_type", "platform")


def category_of(sample: Sample) -> str | None:
    """`sample.category`, else the first of CATEGORY_KEYS in the metadata (extra keys of the original
    records), else a V* folder name in the image path."""
    if sample.category:
        return sample.category
    for key in CATEGORY_KEYS:
        value = sample.metadata.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
            return str(value)
    return path_category(sample.images)
