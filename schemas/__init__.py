"""Message definitions and the single decode/encode entry point."""

from schemas.codec import Message, decode, encode, error_message, make
from schemas.fields import is_valid_id
from schemas.messages import MESSAGES, PROTOCOL_VERSION

__all__ = ["MESSAGES", "PROTOCOL_VERSION", "Message", "decode", "encode", "error_message", "make", "is_valid_id"]
