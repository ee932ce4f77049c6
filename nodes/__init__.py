"""The pack's ComfyUI nodes (V3 schema, pinned to comfy_api v0.0.2). Imported only by ComfyUI."""
from ._api import ComfyExtension, io
from .classifier_nodes import ImageNetClass, LoadImageClassifier, LoadZeroShotClassifier
from .edm2_nodes import EDM2_NODES
from .cg_nodes import ClassifierGuidanceNode
from .guider_nodes import GFCGCombinerNode, GFCGGuiderNode, GFCGModelPatchNode
from .trace_nodes import GuidanceTracePlot

NODES = [LoadImageClassifier, LoadZeroShotClassifier, ImageNetClass, GFCGGuiderNode, GFCGCombinerNode,
         GFCGModelPatchNode, GuidanceTracePlot, ClassifierGuidanceNode, *EDM2_NODES]


class GFCGExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
