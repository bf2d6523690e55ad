"""nbval settings for the labs: coarse progress bars while the notebooks run under pytest.

nbval reads a cell's output only after the cell has finished, and the kernel's output socket
(ZeroMQ PUB) drops messages once its queue is full, the cell's closing "idle" message included;
nbval then fails the cell with "Timeout of 5 seconds exceeded waiting for output". Progress bars
refreshing every 0.1 s over a 7-minute cell send more than a thousand messages (Lab 07 from an empty cache:
1,716; 553 with this setting), so under pytest every tqdm bar refreshes at most every 10 s
(tqdm reads TQDM_MININTERVAL). JupyterLab reads output as it comes and keeps tqdm's default.
"""
import os

os.environ.setdefault("TQDM_MININTERVAL", "10")
