"""The kinds of search index and the targets they are tuned to: plain constants, so that the command's parser can
offer them without loading faiss or numpy (`cbir --help` stays quick)."""

INDEX_TYPES = ("auto", "flat", "ivf", "hnsw", "ivfpq")
EXACT_UP_TO = 50_000  # auto: exact search up to this many vectors in a segment
IN_MEMORY_RECALL = 0.99  # approximate indexes held in memory are tuned to this recall@10 ...
ON_DISK_RECALL = 0.95  # ... the on-disk IVF-PQ (re-ranked from float16 rows read per query) to this one
ONDISK = "ivfpq-ondisk"  # IVF-PQ with its lists on disk, re-ranked with exact rows (cbir.search.ondisk)
