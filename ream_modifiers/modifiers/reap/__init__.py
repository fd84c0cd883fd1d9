# ruff: noqa
from .base import *
