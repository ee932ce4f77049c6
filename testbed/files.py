"""Where the committed testbed weights live (no heavy imports: ComfyUI glue reads this)."""
import os

from ..common.folders import bundled_folders

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
EDM2_DIR = bundled_folders("edm2")[0]                     # testbed/weights/edm2
CLASSIFIER_DIR = bundled_folders("gfcg_classifiers")[0]   # testbed/weights/classifiers

# Diffusion models and classifiers in their own sub-folders: the pack registers them with ComfyUI's
# "edm2" and "gfcg_classifiers" folders, so the testbed shows up in the loaders' lists.
FILES = {"main": "edm2/gfcg_testbed_main.safetensors", "guide": "edm2/gfcg_testbed_guide.safetensors",
         "guidance_classifier": "classifiers/gfcg_testbed_guidance_regnetx002.safetensors",
         "eval_classifier": "classifiers/gfcg_testbed_eval_resnet.safetensors"}
