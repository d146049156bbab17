import sys
from pathlib import Path

# Test helpers (netns, fakes) are plain modules beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
