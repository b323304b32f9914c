"""One router per aggregate."""
