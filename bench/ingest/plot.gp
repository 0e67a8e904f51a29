# bench/ingest/plot.gp: the 32K prefill's timeline as a PNG. Called by
# bench/ingest/run.sh with
#   gnuplot -e "binfile='...'; progress='...'; marks='...'; outfile='...'; title_text='...'" plot.gp
# Inputs from bench/ingest/bins.py: binfile `t MB/s` (acknowledged bytes in
# 1-second bins), progress `t acked_% indexed_%`, marks `t "label"`.
set terminal pngcairo size 1100,600 font ",10"
set output outfile
set title title_text
set xlabel "seconds since the first append"
set ylabel "ingest rate, MB/s acknowledged (1 s bins)"
set y2label "% of the prefill acknowledged / indexed"
set ytics nomirror
set y2tics
set y2range [0:105]
set yrange [0:*]
set grid
set key top left opaque
set style fill solid 0.5 noborder
plot binfile using 1:2 with boxes lc rgb "#4477aa" title "ingest rate (MB/s)", \
     progress using 1:2 axes x1y2 with lines lw 2 dt 2 lc rgb "#228833" title "acknowledged (%)", \
     progress using 1:3 axes x1y2 with lines lw 2 lc rgb "#ee6677" title "indexed (%), polled after the last append", \
     marks using 1:(105) axes x1y2 with impulses dt 3 lc rgb "#555555" notitle, \
     marks using 1:(3):2 axes x1y2 with labels rotate by 90 left offset -0.8,0 notitle
