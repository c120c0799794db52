from .configuration_blip2_bridge import Blip2BridgeConfig, Blip2BridgeQFormerConfig


__all__ = ["Blip2BridgeConfig", "Blip2BridgeQFormerConfig"]
