"""Aligns two fixed HEALPix pixel trees with hats (after deepfield's cache_hats_kernels) and prints, as JSON, how
many functions were swapped, the alignments' pixel mappings and the cache hits of the alignment kernels."""
import json

from deepfield.catalogs.jit_cache import cache_hats_kernels

swapped = cache_hats_kernels()
from hats.pixel_math import HealpixPixel  # noqa: E402
from hats.pixel_tree import pixel_alignment as pa  # noqa: E402
from hats.pixel_tree.pixel_tree import PixelTree  # noqa: E402

left = PixelTree.from_healpix([HealpixPixel(1, 0), HealpixPixel(1, 1), HealpixPixel(2, 40)])
right = PixelTree.from_healpix([HealpixPixel(2, 0), HealpixPixel(2, 5), HealpixPixel(1, 2), HealpixPixel(3, 170)])
out = {}
for kind in ("INNER", "OUTER", "LEFT"):
    mapping = pa.align_trees(left, right, pa.PixelAlignmentType[kind]).pixel_mapping
    out[kind] = mapping.astype(float).fillna(-1).values.tolist()
kernels = [getattr(pa, f) for f in ("perform_align_trees", "perform_inner_align_trees")]
hits = sum(sum(k.stats.cache_hits.values()) for k in kernels if hasattr(k, "stats"))
print(json.dumps(dict(swapped=swapped, out=out, hits=hits)))
