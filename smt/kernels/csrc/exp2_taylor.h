/* Constants of the kernels' exponentials, in one place: log2(e), and the Taylor coefficients of
 * 2^f = exp(f ln2), EXP2_Ti = ln2^i / i!. selective_scan.c's vexp2 (the scan's decay) sums them to degree 6,
 * window_attention.c's exp2_nonpositive (the softmax) to degree 5; both take |f| <= 1/2. */
#ifndef SMT_EXP2_TAYLOR_H
#define SMT_EXP2_TAYLOR_H

#define LOG2E 1.44269504088896341f
#define EXP2_T0 1.0f
#define EXP2_T1 6.9314718055994531e-1f
#define EXP2_T2 2.4022650695910071e-1f
#define EXP2_T3 5.5504108664821580e-2f
#define EXP2_T4 9.6181291076284772e-3f
#define EXP2_T5 1.3333558146428443e-3f
#define EXP2_T6 1.5403530393381609e-4f

#endif
