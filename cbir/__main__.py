from cbir.cli import run

run()
