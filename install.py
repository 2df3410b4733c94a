"""Install FidelityQuant's Python dependencies (never torch: the host application owns it).

Run by ComfyUI-Manager after cloning, and by AUTOMATIC1111 / Forge on start-up (where `import launch`
works). Also runnable by hand: `python install.py`.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements() -> list[str]:
    with open(os.path.join(HERE, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def main() -> None:
    try:
        import launch  # AUTOMATIC1111 / Forge
    except ImportError:
        launch = None
    for req in requirements():
        name = req.split(">")[0].split("=")[0].split("<")[0].strip()
        if launch is not None:
            if not launch.is_installed(name):
                launch.run_pip(f'install "{req}"', f"FidelityQuant requirement: {req}")
            continue
        subprocess.check_call([sys.executable, "-m", "pip", "install", req])


if __name__ == "__main__":  # ComfyUI-Manager and A1111 both run this file as a script
    main()
