from .image_processing_blip2_bridge import Blip2BridgeImageProcessor
from .processing_blip2_bridge import Blip2BridgeProcessor


__all__ = ["Blip2BridgeImageProcessor", "Blip2BridgeProcessor"]
