"""Object boxes: the `Boxes` type, selection (NMS and capping), the square-frame transform, taggers, the
OWLv2 detector, box files, the one box look-up rule (`lookup`) and the online proposer (docs/design.md sections 5
and 7)."""

from .detector import Owlv2Detector
from .files import BoxIndex, BoxRecord
from .lookup import BoxLookup, ImageKey, MissingBoxes
from .proposer import BoxProposer, Proposal
from .select import BoxOptions, FrameMap, prepare_boxes, select_boxes
from .taggers import ClipTagger, FixedTagger, RamPlusTagger, load_vocabulary
from .types import Boxes

__all__ = [
    "BoxIndex",
    "BoxLookup",
    "BoxOptions",
    "BoxProposer",
    "BoxRecord",
    "Boxes",
    "ClipTagger",
    "FixedTagger",
    "FrameMap",
    "ImageKey",
    "MissingBoxes",
    "Owlv2Detector",
    "Proposal",
    "RamPlusTagger",
    "load_vocabulary",
    "prepare_boxes",
    "select_boxes",
]
