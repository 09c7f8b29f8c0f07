"""moesim's Streamlit dashboard: ``moesim dashboard`` or ``streamlit run dashboard/app.py``."""
