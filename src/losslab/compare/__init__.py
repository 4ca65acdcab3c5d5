"""losslab.compare: ``losslab compare``, loss variants x seeds with statistics and a report.

- :mod:`~losslab.compare.config`: the study file, and a variant x seed resolved to a training config;
- :mod:`~losslab.compare.runs`: the runs of a study (plan, train resumably, read their outputs);
- :mod:`~losslab.compare.tuning`: Optuna tuning of a variant's declared parameters;
- :mod:`~losslab.compare.stats`, :mod:`~losslab.compare.examples`: tests over seeds and over test examples;
- :mod:`~losslab.compare.results`, :mod:`~losslab.compare.report`: ``results.json``, ``report.html``;
- :mod:`~losslab.compare.study`: the study end to end, and the command.

See docs/compare.md.
"""
