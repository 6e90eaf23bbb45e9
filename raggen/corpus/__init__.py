"""Corpus: passage readers/writers, DPR-style chunking, QA files and the generated world."""

from raggen.corpus.chunking import chunk_documents, chunk_words
from raggen.corpus.qa import QAExample, read_qa, write_qa_csv, write_qa_jsonl
from raggen.corpus.readers import (
    atomic_writer,
    detect_format,
    iter_passage_batches,
    read_passages,
    write_passages,
)
from raggen.corpus.world import (
    ChangedFact,
    Fact,
    World,
    WorldConfig,
    WorldFiles,
    build_world,
    read_changed_facts,
    reader_examples,
    write_world,
)
from raggen.corpus.world_passages import Entity

__all__ = [
    "ChangedFact",
    "Entity",
    "Fact",
    "QAExample",
    "World",
    "WorldConfig",
    "WorldFiles",
    "atomic_writer",
    "build_world",
    "chunk_documents",
    "chunk_words",
    "detect_format",
    "iter_passage_batches",
    "read_changed_facts",
    "read_passages",
    "read_qa",
    "reader_examples",
    "write_passages",
    "write_qa_csv",
    "write_qa_jsonl",
    "write_world",
]
