import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The dev server passes /aisdk/ to the gateway, so the page and the API share an origin
// (no CORS to set up). STREAMGATE_URL names the gateway.
const gateway = process.env.STREAMGATE_URL ?? "http://127.0.0.1:8000";

export default defineConfig({
  plugins: [react()],
  server: { proxy: { "/aisdk": { target: gateway, changeOrigin: true } } },
  preview: { proxy: { "/aisdk": { target: gateway, changeOrigin: true } } },
});
