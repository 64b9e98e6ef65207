"""KB index folders: a KB's entity vectors, encoded once by a caller-supplied encoder, searched exactly or through a
faiss structure, grown and shrunk without re-encoding (:mod:`nel_model.index.folder`; layout in
``docs/CONTRACTS.md`` "KB index folders")."""

from nel_model.index.approx import APPROX_KINDS, HNSWParams, IVFPQParams
from nel_model.index.folder import (DEFAULT_APPROX_KIND, INDEX_KINDS, EntityBatch, IndexMismatch, KBIndexFolder,
                                    matrix_index)

__all__ = ["APPROX_KINDS", "DEFAULT_APPROX_KIND", "INDEX_KINDS", "EntityBatch", "HNSWParams", "IVFPQParams",
           "IndexMismatch", "KBIndexFolder", "matrix_index"]
