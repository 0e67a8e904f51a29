from typing import Dict, Union

from ._kvstore import *  # noqa: F401,F403
from ._kvstore import __version__ as __version__


def features() -> Dict[str, Union[str, bool]]: ...
