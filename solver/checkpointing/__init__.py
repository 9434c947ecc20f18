"""The checkpoint subsystem: files, their verification, sharded and async saving, inspection.

It knows no solver: it saves and loads nested dicts of tensors. `format` is the file format
(header, digests, read/verify/write), `fs` the durable-write helpers, `archive` the fast
torch-zip writer/reader, `sharded` DCP shard folders for FSDP, `writer` sync/async saving,
`store` incremental (content-addressed) storage, `inspect` a command-line look at one file.
"""
