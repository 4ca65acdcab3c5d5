"""losslab.eval: evaluation metrics by task, as pure functions and exact streaming accumulators.

Arrays in (numpy, torch or lists), Python floats out. Metric names are flat and namespaced by
split when written (``test/accuracy``); see ``docs/metrics.md`` for every name and formula.

- :mod:`~losslab.eval.classification`: accuracy, the per-class report, multi-label, regression
- :mod:`~losslab.eval.ner`: entity-level seqeval report
- :mod:`~losslab.eval.generation`: BLEU, chrF, distinct-n, paired bootstrap between systems
- :mod:`~losslab.eval.language_model`: streaming token loss and perplexity
- :mod:`~losslab.eval.ranking`: reward-model pairwise accuracy, retrieval recall@k and MRR
- :mod:`~losslab.eval.report`: text / Markdown tables and an atomic ``metrics.json`` writer
"""

from losslab.eval.bootstrap import PairedBootstrapResult, paired_bootstrap
from losslab.eval.classification import (
    ClassificationAccumulator,
    PerClassReport,
    Scores,
    accuracy,
    classification_report,
    confusion_matrix,
    multilabel_report,
    regression_metrics,
    report_from_confusion,
    report_from_counts,
)
from losslab.eval.generation import (
    CorpusScore,
    GenerationReport,
    corpus_bleu,
    corpus_chrf,
    distinct_n,
    generation_report,
    paired_bootstrap_generation,
)
from losslab.eval.language_model import PerplexityAccumulator, perplexity, token_nll_sum
from losslab.eval.ner import ids_to_tags, ner_report
from losslab.eval.ranking import pairwise_accuracy, retrieval_metrics, reward_margin, reward_metrics, target_ranks
from losslab.eval.report import (
    format_markdown_table,
    format_metrics_markdown,
    format_metrics_table,
    format_table,
    namespace,
    read_metrics_json,
    write_metrics_json,
)

__all__ = [
    "ClassificationAccumulator",
    "CorpusScore",
    "GenerationReport",
    "PairedBootstrapResult",
    "PerClassReport",
    "PerplexityAccumulator",
    "Scores",
    "accuracy",
    "classification_report",
    "confusion_matrix",
    "corpus_bleu",
    "corpus_chrf",
    "distinct_n",
    "format_markdown_table",
    "format_metrics_markdown",
    "format_metrics_table",
    "format_table",
    "generation_report",
    "ids_to_tags",
    "multilabel_report",
    "namespace",
    "ner_report",
    "paired_bootstrap",
    "paired_bootstrap_generation",
    "pairwise_accuracy",
    "perplexity",
    "read_metrics_json",
    "regression_metrics",
    "report_from_confusion",
    "report_from_counts",
    "retrieval_metrics",
    "reward_margin",
    "reward_metrics",
    "target_ranks",
    "token_nll_sum",
    "write_metrics_json",
]
