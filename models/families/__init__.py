"""Model families; importing this package registers every model of the zoo."""
from . import classification, detection, sam, vit  # noqa: F401
