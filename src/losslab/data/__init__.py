"""losslab.data: records and datasets.

- :mod:`~losslab.data.schemas`: the contract record formats as strict pydantic models;
- :mod:`~losslab.data.records`: reading record files with errors that name file, line and field;
- :mod:`~losslab.data.sources`: the builtin datasets and the readers of the packages that ship them;
- :mod:`~losslab.data.builtin`: preparing them as JSONL splits, and the data files a config names;
- :mod:`~losslab.data.prepare`: the ``losslab data prepare`` command.

See docs/data.md.
"""
