from r2m_ext.cli import run

run()
