"""The checkpoint subsystem: files, their verification, sharded and async saving, inspection.

It knows no solver: it saves and loads nested dicts of tensors, and imports nothing of `solver.`
but `solver.errors` (tests/test_imports.py); ranks reach it as an argument (`ranks.Ranks`).

    manager      CheckpointManager: save decisions, restore, continue_from, rollback
    policy       when to save, and retention (which files stay)        config  checkpoint.* keys
    naming       file names, and the one grammar a checkpoint is named by (sig, //sig/, URL...)
    envelope     one file: header, digests, atomic write, safe read     faults  its errors
    listing      a folder's epoch files and their metrics                recovery  newest intact
    archive      the fast torch-zip writer/reader;  directio  O_DIRECT and flush-behind sinks
    codec        checkpoint.compress: tensors as zstd frames, and their bounded decoding
    unpickler    the restricted unpickler a checkpoint from elsewhere is read with
    sharded      DCP shard folders for FSDP;  dcp_reader  the hardened reader of such folders
    writer       sync/async saving, staging buffers
    store, blobs incremental storage: one blob store per Dora folder (<dora>/blobs), collection
    remote       the object-storage mirror;  fetch  fetching back;  objectstore  URLs, retries
    fs, lock, ranks, tree, digest   durable file helpers, the experiment and store locks, the ranks that
                 save together, the walker over nested states, tensor digests
    weights      weights-only files: export's format, and `checkpoint.keep_dtype`'s kept files
    examine      `solver-inspect`: a command-line look at one file
"""
